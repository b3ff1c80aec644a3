//! A loopback TCP link to a server that a test can break at an exact moment: the network
//! failing after Redis ran a command but before its answer reached latchkey. Bytes pass
//! through unchanged; the only fault it adds is closing a real connection.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::task::AbortOnDropHandle;

/// Relays every connection made to `port` on to the server's port, until dropped.
pub struct Link {
    pub port: u16,
    /// The command whose answer the next connection sending it loses (see `lose_answer_to`).
    armed: Arc<Mutex<Option<String>>>,
    cuts: Arc<AtomicUsize>,
    _relay: AbortOnDropHandle<()>,
}

impl Link {
    pub async fn to(server_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let port = listener.local_addr().expect("the link's port").port();
        let armed = Arc::new(Mutex::new(None::<String>));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (relay_armed, relay_cuts) = (armed.clone(), cuts.clone());
        let relay = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (armed, cuts) = (relay_armed.clone(), relay_cuts.clone());
                connections.spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await {
                        relay_one(client, server, &armed, &cuts).await;
                    }
                });
            }
        });
        Self {
            port,
            armed,
            cuts,
            _relay: AbortOnDropHandle::new(relay),
        }
    }

    /// A Redis URL through the link.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next connection to send `command` (as it appears on the wire, e.g. `EVALSHA`)
    /// passes it on, and is then closed the moment the server answers, the answer dropped.
    pub fn lose_answer_to(&self, command: &str) {
        *self.armed.lock().unwrap() = Some(command.to_owned());
    }

    /// How many answers the link has dropped so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Runs `call` with the answer to the next `command` lost (see `lose_answer_to`), and
    /// checks that the link did drop one: otherwise the test would prove nothing.
    pub async fn losing_answer_to<T>(&self, command: &str, call: impl Future<Output = T>) -> T {
        let cuts = self.cuts();
        self.lose_answer_to(command);
        let answer = call.await;
        assert_eq!(
            self.cuts(),
            cuts + 1,
            "the link dropped no answer to {command}"
        );
        answer
    }
}

async fn relay_one(
    mut client: TcpStream,
    mut server: TcpStream,
    armed: &Mutex<Option<String>>,
    cuts: &AtomicUsize,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut doomed = false;
    loop {
        tokio::select! {
            read = client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                let sent = &up[..n];
                {
                    let mut armed = armed.lock().unwrap();
                    if armed.as_ref().is_some_and(|c| contains(sent, c.as_bytes())) {
                        *armed = None;
                        doomed = true;
                    }
                }
                if server.write_all(sent).await.is_err() {
                    return;
                }
            }
            read = server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if doomed {
                    cuts.fetch_add(1, Ordering::SeqCst);
                    return; // both sockets close here; the answer is never passed on
                }
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
