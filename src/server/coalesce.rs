//! Write coalescing for server connections: responses that become ready in the same scheduler
//! pass leave in one TLS record and one `writev`, not one each.
//!
//! hyper's HTTP/2 server flushes the connection each time it has sent what is queued. With the
//! handler finishing synchronously and tokio running a woken task next, that is one flush for a
//! response's HEADERS, and another for its DATA and trailers, so every certificate cost two TLS
//! records and two trips through the loopback stack, even when the client sent several requests
//! in one segment.
//!
//! [`CoalescingIo`] sits between HTTP/2 and TLS. Writes go to a buffer; the first `poll_flush`
//! after a write schedules the connection task again instead of flushing, so every stream task
//! already runnable gets to queue its frames first; the next `poll_flush` writes the buffer to TLS
//! and flushes. Nothing waits on a timer: when nothing else is runnable, the delay is one trip
//! through the run queue. The buffer is bounded ([`MAX_BUFFERED`]): past it, a write first drains
//! to TLS and waits on the socket like any other write would.
//!
//! Our own, with a measured reason: hyper, h2 and tokio-rustls have no equivalent (a
//! `tokio::io::BufWriter` flushes when hyper flushes: `strace -c` counted the same 1.8 `writev`
//! per response with and without it). This wrapper took `writev` per certificate from 2.0 to
//! 0.63 and earned about 8 points of the end-to-end / raw-crypto ratio, pinned
//! (`cargo bench --bench create_certificate -- --seconds 12 --pin --client h2load`, see
//! docs/BENCHMARKS.md).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

use super::io_wrapper::pass_reads_through;

/// Bytes buffered before a write must drain to the transport first.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// An I/O stream whose flushes are deferred by one scheduler pass and whose writes are batched
/// (see the module docs). Reads pass straight through.
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` has been handed to `inner` already.
    written: usize,
    /// A flush was asked for and deferred once; the next one goes through.
    deferred: bool,
}

impl<T> CoalescingIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Hands the whole buffer to `inner`; `Ready(Ok)` once it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for a write: drains first when the buffer is full.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

pass_reads_through!(CoalescingIo);

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            self.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && !self.deferred {
            // Let every runnable stream task queue its frames before this flush: the task is
            // woken now and polled again after them.
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.deferred = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// A transport that records every write it receives, so a test can count them. No real
    /// socket is needed: what is under test is how writes are grouped before they reach one.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        flushes: Arc<Mutex<usize>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.lock().expect("lock").push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.flushes.lock().expect("lock") += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_before_a_flush_reach_the_transport_as_one_write() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"headers").await.expect("write");
        io.write_all(b"data").await.expect("write");
        assert!(rec.writes.lock().expect("lock").is_empty());
        io.flush().await.expect("flush");
        assert_eq!(
            *rec.writes.lock().expect("lock"),
            vec![b"headersdata".to_vec()]
        );
        assert_eq!(*rec.flushes.lock().expect("lock"), 1);
    }

    /// Counts wake-ups, so a test can see that a deferred flush asked to be polled again.
    #[derive(Default)]
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_first_flush_yields_once_and_bytes_written_before_the_next_poll_leave_with_it() {
        let rec = Recorder::default();
        let wakes = Arc::new(CountingWaker::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescingIo::new(rec.clone());
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(rec.writes.lock().expect("lock").is_empty());
        // Another stream's response, queued while the connection task waited its turn.
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"two"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(*rec.writes.lock().expect("lock"), vec![b"onetwo".to_vec()]);
        // With nothing buffered, a flush goes straight through.
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(*rec.flushes.lock().expect("lock"), 2);
    }

    #[test]
    fn a_write_past_the_buffer_bound_drains_the_buffer_first() {
        let rec = Recorder::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = CoalescingIo::new(rec.clone());
        let chunk = vec![7u8; MAX_BUFFERED];
        assert!(Pin::new(&mut io).poll_write(&mut cx, &chunk).is_ready());
        assert!(rec.writes.lock().expect("lock").is_empty());
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"more").is_ready());
        assert_eq!(rec.writes.lock().expect("lock").len(), 1);
        assert_eq!(rec.writes.lock().expect("lock")[0].len(), MAX_BUFFERED);
        assert_eq!(io.buf, b"more");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_buffered() {
        let rec = Recorder::default();
        let mut io = CoalescingIo::new(rec.clone());
        io.write_all(b"goaway").await.expect("write");
        io.shutdown().await.expect("shutdown");
        assert_eq!(*rec.writes.lock().expect("lock"), vec![b"goaway".to_vec()]);
    }
}
