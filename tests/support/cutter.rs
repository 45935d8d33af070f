//! A TCP proxy that cuts connections at seeded points: write failures as a client meets
//! them on a real network (a packet cut half way, the connection gone), between a client
//! under test and a real broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy: connect to `port`; `connections` counts what it accepted.
pub struct Cutter {
    pub port: u16,
    pub connections: Arc<AtomicUsize>,
}

/// Proxy to `127.0.0.1:upstream`. Each of the first `cuts` connections is cut after a
/// number of client-to-upstream bytes drawn from `range` with `seed` (mid-packet more
/// often than not); later connections pass everything.
pub async fn start(upstream: u16, seed: u64, cuts: usize, range: std::ops::Range<usize>) -> Cutter {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let made = connections.clone();
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        while let Ok((client, _)) = listener.accept().await {
            let n = made.fetch_add(1, Ordering::SeqCst);
            let limit = (n < cuts).then(|| rng.usize(range.clone()));
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            tokio::spawn(pipe(client, up, limit));
        }
    });
    Cutter { port, connections }
}

async fn pipe(client: TcpStream, upstream: TcpStream, limit: Option<usize>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        let mut buf = [0u8; 512];
        let mut sent = 0usize;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let n = match limit {
                Some(l) if sent + n >= l => {
                    // Half a packet, then FIN: the broker answers what it got whole and
                    // closes, as a broker does on a packet it refuses.
                    let _ = uw.write_all(&buf[..l - sent]).await;
                    let _ = uw.shutdown().await;
                    return;
                }
                _ => n,
            };
            if uw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    };
    let down = tokio::io::copy(&mut ur, &mut cw);
    tokio::pin!(down);
    tokio::select! {
        // Pass on the broker's last acknowledgements, then close: they reach the client
        // together with the end of the connection.
        _ = up => drop(tokio::time::timeout(std::time::Duration::from_millis(200), &mut down).await),
        _ = &mut down => {}
    }
}
