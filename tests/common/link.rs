//! A loopback TCP link to a server that a test can break at an exact moment: the network
//! failing after Redis ran a command but before its answer reached latchkey. Bytes pass
//! through unchanged; the only fault it adds is closing a real connection.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_util::task::AbortOnDropHandle;

/// Relays every connection made to `port` on to the server's port, until dropped.
pub struct Link {
    pub port: u16,
    /// The command whose answer the next connection sending it loses (see `lose_answer_to`),
    /// and whether that connection then stays open until `gate` lets it close.
    armed: Arc<Mutex<Option<Armed>>>,
    /// How many answers the link has dropped so far.
    cuts: watch::Sender<usize>,
    /// Permits for connections held open after dropping an answer.
    gate: Arc<Semaphore>,
    _relay: AbortOnDropHandle<()>,
}

struct Armed {
    command: String,
    hold: bool,
}

impl Link {
    pub async fn to(server_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let port = listener.local_addr().expect("the link's port").port();
        let armed = Arc::new(Mutex::new(None::<Armed>));
        let cuts = watch::Sender::new(0);
        let gate = Arc::new(Semaphore::new(0));
        let (relay_armed, relay_cuts, relay_gate) = (armed.clone(), cuts.clone(), gate.clone());
        let relay = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (armed, cuts, gate) =
                    (relay_armed.clone(), relay_cuts.clone(), relay_gate.clone());
                connections.spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await {
                        relay_one(client, server, &armed, &cuts, &gate).await;
                    }
                });
            }
        });
        Self {
            port,
            armed,
            cuts,
            gate,
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
        self.arm(command, false);
    }

    fn arm(&self, command: &str, hold: bool) {
        *self.armed.lock().unwrap() = Some(Armed {
            command: command.to_owned(),
            hold,
        });
    }

    /// How many answers the link has dropped so far.
    pub fn cuts(&self) -> usize {
        *self.cuts.borrow()
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

    /// Like `losing_answer_to`, but the connection that lost the answer stays open while
    /// `meanwhile` runs, and closes only after it: whatever `meanwhile` does happens after
    /// the server ran the command and before the client can send it again.
    pub async fn losing_answer_to_while<T, M>(
        &self,
        command: &str,
        call: impl Future<Output = T>,
        meanwhile: impl Future<Output = M>,
    ) -> (T, M) {
        let cuts = self.cuts();
        self.arm(command, true);
        let mut dropped = self.cuts.subscribe();
        let meanwhile = async {
            // Bounded, so a command that never reaches the link fails the test, not hangs it.
            tokio::time::timeout(Duration::from_secs(30), dropped.wait_for(|&n| n > cuts))
                .await
                .unwrap_or_else(|_| panic!("the link dropped no answer to {command} in 30 s"))
                .expect("the link is alive");
            let done = meanwhile.await;
            self.gate.add_permits(1);
            done
        };
        let both = tokio::join!(call, meanwhile);
        assert_eq!(
            self.cuts(),
            cuts + 1,
            "the link dropped no answer to {command}"
        );
        both
    }
}

async fn relay_one(
    mut client: TcpStream,
    mut server: TcpStream,
    armed: &Mutex<Option<Armed>>,
    cuts: &watch::Sender<usize>,
    gate: &Semaphore,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    // Some(hold) once this connection sent the armed command.
    let mut doomed = None;
    loop {
        tokio::select! {
            read = client.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                let sent = &up[..n];
                {
                    let mut armed = armed.lock().unwrap();
                    if armed.as_ref().is_some_and(|a| contains(sent, a.command.as_bytes())) {
                        doomed = armed.take().map(|a| a.hold);
                    }
                }
                if server.write_all(sent).await.is_err() {
                    return;
                }
            }
            read = server.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if let Some(hold) = doomed {
                    cuts.send_modify(|n| *n += 1);
                    if hold {
                        // Open, answering nothing, until the test lets it close.
                        gate.acquire().await.expect("the gate stays open").forget();
                    }
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
