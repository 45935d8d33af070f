//! A write deadline for the HTTP part of a panel connection. hyper bounds how long a
//! request head may take to arrive (`header_read_timeout`) but not how long a response
//! may take to leave: a client that asks for `/page.js` and never reads the answer
//! would hold its connection, and with enough of them every connection slot, for ever.
//! [`WriteDeadline`] fails a write that makes no progress for its limit, which ends the
//! connection. Once the connection is a panel's WebSocket, [`Disarm`] turns it off: a
//! panel that falls behind is the session's business (gaps, `slow_policy`, the idle
//! timeout), not a reason to drop it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `io` whose writes and flushes fail with `TimedOut` after `limit` without progress,
/// until disarmed.
pub(super) struct WriteDeadline<S> {
    io: S,
    limit: Duration,
    armed: Arc<AtomicBool>,
    /// Running while a write or flush waits; dropped when one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

/// Turns a [`WriteDeadline`] off for good (after the WebSocket upgrade).
pub(super) struct Disarm(Arc<AtomicBool>);

impl Disarm {
    pub(super) fn disarm(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Wrap `io`; the [`Disarm`] turns the deadline off.
pub(super) fn write_deadline<S>(io: S, limit: Duration) -> (WriteDeadline<S>, Disarm) {
    let armed = Arc::new(AtomicBool::new(true));
    let w = WriteDeadline {
        io,
        limit,
        armed: armed.clone(),
        stalled: None,
    };
    (w, Disarm(armed))
}

impl<S> WriteDeadline<S> {
    /// What a write or flush that returned `r` returns: progress resets the deadline;
    /// waiting starts it (or, past it, fails).
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() || !self.armed.load(Ordering::Relaxed) {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_limit_unless_disarmed() {
        // A pipe with room for 16 bytes whose other end is never read.
        let (a, _b) = tokio::io::duplex(16);
        let (mut w, _disarm) = write_deadline(a, Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        let e = w.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));

        let (a, _b) = tokio::io::duplex(16);
        let (mut w, disarm) = write_deadline(a, Duration::from_secs(10));
        disarm.disarm();
        let r = tokio::time::timeout(Duration::from_secs(60), w.write_all(&[0u8; 64])).await;
        assert!(r.is_err(), "disarmed: the write just waits");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_restarts_the_deadline() {
        let (a, mut b) = tokio::io::duplex(16);
        let (mut w, _disarm) = write_deadline(a, Duration::from_secs(10));
        // The reader takes 16 bytes every 6 s: each wait is shorter than the limit.
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            let mut got = 0;
            while got < 64 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                got += b.read(&mut buf).await.unwrap();
            }
        });
        w.write_all(&[0u8; 64]).await.unwrap();
        reader.await.unwrap();
    }
}
