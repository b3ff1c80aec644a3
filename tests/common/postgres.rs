//! A throwaway database on a PostgreSQL server: created with a fresh name, dropped (with the
//! connections still open to it) when the value is dropped, however the test or benchmark run
//! ends. Shared by the tests (`TestDb`) and the benchmark (`--postgres-url`).

use std::time::Duration;

/// A database `<prefix>_<uuid>` on the server at `admin_url`, removed on drop.
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    /// How to connect to it: `admin_url` with its database swapped for this one.
    pub url: String,
}

impl PgDatabase {
    pub async fn create(admin_url: &str, prefix: &str) -> Result<Self, sqlx::Error> {
        use sqlx::{Connection, Executor};
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside a Tokio runtime, which cannot block on a future: a thread with
        // a runtime of its own does. FORCE ends the connections of a latchkey still running.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            use sqlx::{Connection, Executor};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let drop = async {
                    let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    conn.execute(sql.as_str()).await?;
                    Ok::<_, sqlx::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(10), drop).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("no answer within 10 s".into()),
                }
            })
        })
        .join();
        let why = match dropped {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(_) => "the dropping thread panicked".into(),
        };
        eprintln!("could not drop the database {}: {why}", self.name);
    }
}
