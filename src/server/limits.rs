//! Bounds on what a client can make the server hold, and the count of every refusal they cause.
//!
//! Two layers:
//! - **Connections** ([`ConnectionGuard`], [`Guarded`]): a cap on open connections per listener
//!   (a semaphore permit travels with each connection, as in mini-redis), the TLS handshake
//!   timeout, an idle timeout (nothing read from the client, or a write blocked, for that long
//!   closes the connection, before, during and after HTTP/2), and the drain deadline (at
//!   shutdown plus that deadline every remaining connection's I/O fails, so a stalled client
//!   cannot hold up the exit). The gRPC listener uses it below TLS; the HTTP probe/metrics
//!   listener through [`GuardedListener`].
//! - **Requests** ([`RequestLimits`]): a per-request deadline (`DEADLINE_EXCEEDED`) and a gRPC
//!   message size limit checked on each message's length prefix before it is buffered
//!   (`RESOURCE_EXHAUSTED`, as gRPC's status-code table says). Unknown methods and messages
//!   that are not valid protobuf (`malformed_message`, answered `INTERNAL` by tonic) are counted
//!   and audited too.
//!
//! HTTP/2 settings (max concurrent streams, header-list size, keepalive) are applied by hyper
//! from [`ServerLimits`] in `app`; what h2 refuses under them is counted by
//! [`RefusalWatch`](super::RefusalWatch). Each refusal increments
//! `meshid_transport_refusals_total{listener, reason}`; the per-request ones also write a
//! `meshid::audit` line.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use super::ca_service::Peer;
use super::{CoalescingIo, RefusalWatch};
use crate::identity::truncate_echo;
use crate::telemetry::ServerMetrics;

/// Default for [`ServerLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default for [`ServerLimits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ServerLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ServerLimits::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default for [`ServerLimits::keepalive_timeout`].
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ServerLimits::max_concurrent_streams`].
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Default for [`ServerLimits::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`ServerLimits::max_header_list_size`]: room for a 100 KiB token, so that an
/// oversized token reaches the handler and gets a typed, audited refusal.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 128 * 1024;
/// Default for [`ServerLimits::max_message_size`]; a CSR with an 8192-bit RSA key is about 4 KiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Default for [`ServerLimits::drain_deadline`].
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Connections the HTTP probe/metrics listener holds at once.
pub const HTTP_MAX_CONNECTIONS: usize = 64;

/// Longest piece of client input (a method path) echoed in a log line.
const MAX_ECHO: usize = 128;

/// The limits of the gRPC listener (and, for idle time and drain, the HTTP listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open connections at most; a connection beyond it is closed at once.
    pub max_connections: usize,
    /// A TLS handshake not finished in this time is dropped.
    pub handshake_timeout: Duration,
    /// A connection from which nothing was read, or whose write stayed blocked, this long is
    /// closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval; a connection that answers none within `keepalive_timeout` is
    /// closed.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// Advertised `SETTINGS_MAX_CONCURRENT_STREAMS`; streams beyond it are refused.
    pub max_concurrent_streams: u32,
    /// A request not answered in this time gets `DEADLINE_EXCEEDED`.
    pub request_timeout: Duration,
    /// Advertised `SETTINGS_MAX_HEADER_LIST_SIZE`, bytes.
    pub max_header_list_size: u32,
    /// Largest gRPC message accepted, bytes; larger ones get `RESOURCE_EXHAUSTED`.
    pub max_message_size: usize,
    /// After shutdown starts, connections still open this long later are closed.
    pub drain_deadline: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
        }
    }
}

/// Labels of `meshid_transport_refusals_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `grpc` or `http`.
    pub listener: &'static str,
    /// Why, e.g. `max_connections`, `idle_timeout`, `message_too_large`.
    pub reason: &'static str,
}

/// Counts refusals below the handler, by listener and reason. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Refusals {
    family: Family<RefusalLabels, Counter>,
    listener: &'static str,
}

impl Refusals {
    /// Registers `meshid_transport_refusals_total` in `metrics` and returns the counter for the
    /// gRPC listener; [`Refusals::for_listener`] gives the others.
    pub fn register(metrics: &ServerMetrics) -> Self {
        let family: Family<RefusalLabels, Counter> = metrics.registered(
            "transport_refusals",
            "Connections and requests refused below the CreateCertificate handler",
        );
        Self {
            family,
            listener: "grpc",
        }
    }

    /// The same counter family, labelled with another listener.
    pub fn for_listener(&self, listener: &'static str) -> Self {
        Self {
            family: self.family.clone(),
            listener,
        }
    }

    /// Counts one refusal.
    pub fn count(&self, reason: &'static str) {
        self.family
            .get_or_create(&RefusalLabels {
                listener: self.listener,
                reason,
            })
            .inc();
    }
}

/// Admits connections to one listener: the connection cap, the idle timeout and the drain
/// deadline. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnectionGuard {
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
    hard_stop: watch::Receiver<bool>,
    refusals: Refusals,
}

impl ConnectionGuard {
    /// At most `max_connections` open at once; each closed after `idle_timeout` without
    /// progress, or when `hard_stop` turns true.
    pub fn new(
        max_connections: usize,
        idle_timeout: Duration,
        hard_stop: watch::Receiver<bool>,
        refusals: Refusals,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
            hard_stop,
            refusals,
        }
    }

    /// Takes a slot for `io`, or refuses it (counted as `max_connections`) when none is free.
    /// The slot is released when the returned connection is dropped.
    pub fn admit<T>(&self, io: T) -> Option<Guarded<T>> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refusals.count("max_connections");
            return None;
        };
        let mut hard_stop = self.hard_stop.clone();
        Some(Guarded {
            inner: io,
            _permit: permit,
            idle_timeout: self.idle_timeout,
            read_deadline: Box::pin(tokio::time::sleep(self.idle_timeout)),
            write_stall: None,
            hard_stop: Some(Box::pin(async move {
                let _ = hard_stop.wait_for(|stop| *stop).await;
            })),
            refusals: self.refusals.clone(),
        })
    }

    /// The refusal counter of this listener.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }
}

/// A connection admitted by a [`ConnectionGuard`]. Its I/O fails with `TimedOut` when nothing
/// was read for the idle timeout or a write stayed blocked that long, and with
/// `ConnectionAborted` once the drain deadline has passed.
pub struct Guarded<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    read_deadline: Pin<Box<Sleep>>,
    write_stall: Option<Pin<Box<Sleep>>>,
    /// `None` once it fired (it may not be polled again).
    hard_stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    refusals: Refusals,
}

impl<T> std::fmt::Debug for Guarded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<T> Guarded<T> {
    fn check_stop(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match &mut self.hard_stop {
            None => Err(io::ErrorKind::ConnectionAborted.into()),
            Some(stop) => {
                if stop.as_mut().poll(cx).is_ready() {
                    self.hard_stop = None;
                    self.refusals.count("drain_deadline");
                    return Err(io::ErrorKind::ConnectionAborted.into());
                }
                Ok(())
            }
        }
    }

    /// Called when a write could not proceed: fails once it has been blocked for the idle
    /// timeout.
    fn write_blocked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let idle = self.idle_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if stall.as_mut().poll(cx).is_ready() {
            self.refusals.count("write_stalled");
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(())
    }

    fn poll_write_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>>
    where
        T: Unpin,
    {
        self.check_stop(cx)?;
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Pending => {
                self.write_blocked(cx)?;
                Poll::Pending
            }
            ready => {
                self.write_stall = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_stop(cx)?;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle_timeout;
                    this.read_deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.read_deadline.as_mut().poll(cx).is_ready() {
                    this.refusals.count("idle_timeout");
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
            err => err,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_write_with(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A gRPC connection as tonic serves it: guarded TCP, TLS, write coalescing, and h2's own
/// refusals counted from the frames it writes.
pub type GrpcConnection = RefusalWatch<CoalescingIo<TlsStream<Guarded<TcpStream>>>>;

/// Accepts TCP connections under `guard` and completes TLS handshakes (each within
/// `handshake_timeout`) off the accept loop, feeding finished connections to the gRPC server.
/// Stops at shutdown, closing the listener.
pub async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    guard: ConnectionGuard,
    handshake_timeout: Duration,
    tx: mpsc::Sender<Result<GrpcConnection, io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let Some(stream) = guard.admit(stream) else {
                    tracing::debug!(%peer, "connection refused: connection limit reached");
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let refusals = guard.refusals().clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn =
                                RefusalWatch::new(CoalescingIo::new(tls), refusals, Some(peer));
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(e)) => {
                            refusals.count("handshake_failed");
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            refusals.count("handshake_timeout");
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The HTTP probe/metrics listener under a [`ConnectionGuard`], for `axum::serve`.
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    guard: ConnectionGuard,
}

impl GuardedListener {
    /// Serves connections of `listener` admitted by `guard`.
    pub fn new(listener: TcpListener, guard: ConnectionGuard) -> Self {
        Self { listener, guard }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if let Some(io) = self.guard.admit(stream) {
                        return (io, peer);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A receiver that turns true `deadline` after `shutdown` does: the moment every connection
/// still open is closed.
pub fn drain_deadline(
    mut shutdown: watch::Receiver<bool>,
    deadline: Duration,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {}
            // Every receiver is gone: nothing to close.
            _ = tx.closed() => return,
        }
        tokio::time::sleep(deadline).await;
        let _ = tx.send(true);
    });
    rx
}

/// The per-request limits around the gRPC services `S`: a deadline, the message size limit and
/// a count of unknown methods.
#[derive(Clone)]
pub struct RequestLimits<S> {
    inner: S,
    timeout: Duration,
    max_message_size: usize,
    refusals: Refusals,
}

impl<S> RequestLimits<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limits: &ServerLimits, refusals: Refusals) -> Self {
        Self {
            inner,
            timeout: limits.request_timeout,
            max_message_size: limits.max_message_size,
            refusals,
        }
    }
}

/// The caller's address, for audit lines.
fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
}

/// Counts and audits one per-request refusal.
fn refuse_request(
    refusals: &Refusals,
    reason: &'static str,
    peer: Option<SocketAddr>,
    method: &str,
) {
    refusals.count(reason);
    tracing::warn!(
        target: "meshid::audit",
        reason,
        peer = %Peer(peer),
        method = %truncate_echo(method, MAX_ECHO),
        "request refused"
    );
}

type GrpcResponse = http::Response<Body>;

impl<S> Service<http::Request<Body>> for RequestLimits<S>
where
    S: Service<
            http::Request<Body>,
            Response = GrpcResponse,
            Error = Infallible,
            Future = BoxFuture<GrpcResponse, Infallible>,
        >,
{
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future = BoxFuture<GrpcResponse, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let peer = peer_of(&req);
        let method: Arc<str> = req.uri().path().into();
        let refusals = self.refusals.clone();
        let body_refusal = {
            let refusals = refusals.clone();
            let method = method.clone();
            move || refuse_request(&refusals, "message_too_large", peer, &method)
        };
        let max = self.max_message_size;
        let req = req.map(|body| Body::new(LimitedBody::new(body, max, body_refusal)));
        let call = self.inner.call(req);
        let timeout = self.timeout;
        Box::pin(async move {
            let response = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    refuse_request(&refusals, "deadline_exceeded", peer, &method);
                    return Ok(Status::deadline_exceeded("request deadline exceeded").into_http());
                }
            };
            match response
                .headers()
                .get(Status::GRPC_STATUS)
                .map(|v| Code::from_bytes(v.as_bytes()))
            {
                Some(Code::Unimplemented) => {
                    refuse_request(&refusals, "unknown_method", peer, &method);
                }
                Some(Code::Internal) if is_decode_error(response.headers()) => {
                    refuse_request(&refusals, "malformed_message", peer, &method);
                }
                _ => {}
            }
            Ok(response)
        })
    }
}

/// Whether a trailers-only response is tonic's answer to a request message that is not valid
/// protobuf: `INTERNAL` (as gRPC's status-code table says) with prost's decode error, before
/// any handler ran.
fn is_decode_error(headers: &http::HeaderMap) -> bool {
    Status::from_header_map(headers).is_some_and(|s| s.message().starts_with(DECODE_ERROR_PREFIX))
}

/// How `prost::DecodeError` displays, the message tonic sends for it.
const DECODE_ERROR_PREFIX: &str = "failed to decode Protobuf message";

/// A request body whose gRPC messages may be at most `max` bytes: the 5-byte length prefix of
/// each message is read as it arrives, and a larger one ends the body with
/// `RESOURCE_EXHAUSTED` before the message is buffered.
struct LimitedBody<F> {
    inner: Body,
    max: usize,
    /// Bytes of the current length prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Message bytes still to pass before the next prefix.
    skip: u64,
    /// Called once, when a message is refused; `None` afterwards (the body is over).
    on_refuse: Option<F>,
}

impl<F: FnOnce()> LimitedBody<F> {
    fn new(inner: Body, max: usize, on_refuse: F) -> Self {
        Self {
            inner,
            max,
            prefix: [0; 5],
            prefix_len: 0,
            skip: 0,
            on_refuse: Some(on_refuse),
        }
    }

    /// Walks `data` through the framing; `Err(len)` for the first message over the limit.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), u64> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            self.prefix[self.prefix_len] = data[0];
            self.prefix_len += 1;
            data = &data[1..];
            if self.prefix_len == self.prefix.len() {
                self.prefix_len = 0;
                let len = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                if len > self.max as u64 {
                    return Err(len);
                }
                self.skip = len;
            }
        }
        Ok(())
    }
}

impl<F: FnOnce() + Unpin> HttpBody for LimitedBody<F> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.on_refuse.is_none() {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(data) = frame.data_ref()
            && let Err(len) = this.scan(data.chunk())
        {
            if let Some(refuse) = this.on_refuse.take() {
                refuse();
            }
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "message of {len} bytes exceeds the limit of {} bytes",
                this.max
            )))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.on_refuse.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len as usize));
        out
    }

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c)))),
        );
        Body::new(http_body_util::StreamBody::new(stream))
    }

    async fn drain(mut body: LimitedBody<impl FnOnce() + Unpin>) -> Result<usize, Status> {
        use http_body_util::BodyExt;
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            n += frame?.into_data().map(|d| d.len()).unwrap_or(0);
        }
        Ok(n)
    }

    #[tokio::test]
    async fn messages_up_to_the_limit_pass_even_when_their_prefix_is_split_across_chunks() {
        let mut bytes = framed(100);
        bytes.extend(framed(0));
        bytes.extend(framed(100));
        let total = bytes.len();
        let chunks: Vec<Vec<u8>> = bytes.chunks(3).map(<[u8]>::to_vec).collect();
        let body = LimitedBody::new(body_of(chunks), 100, || panic!("refused"));
        assert_eq!(drain(body).await.unwrap(), total);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_resource_exhausted_before_its_payload_arrives() {
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = refused.clone();
        // Only the 5-byte prefix of a 16 MiB message: the payload never needs to arrive.
        let prefix = framed(16 << 20)[..5].to_vec();
        let body = LimitedBody::new(body_of(vec![framed(10), prefix]), 100, move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst)
        });
        let err = drain(body).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(refused.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_prost_decode_error_is_recognised_in_a_trailers_only_response_and_a_signing_failure_is_not()
    {
        let err = <crate::proto::IstioCertificateRequest as prost::Message>::decode(&[0xff][..])
            .unwrap_err();
        let decode = Status::internal(err.to_string()).into_http::<Body>();
        assert!(is_decode_error(decode.headers()), "{err}");
        let signing = Status::internal("certificate issuance failed").into_http::<Body>();
        assert!(!is_decode_error(signing.headers()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_after_the_idle_timeout_and_frees_its_slot() {
        let (_stop_tx, stop_rx) = watch::channel(false);
        let metrics = ServerMetrics::new();
        let guard = ConnectionGuard::new(
            1,
            Duration::from_secs(5),
            stop_rx,
            Refusals::register(&metrics),
        );
        let (client, server) = tokio::io::duplex(64);
        let mut conn = guard.admit(server).expect("first slot");
        assert!(guard.admit(tokio::io::duplex(64).1).is_none(), "cap of one");
        let mut buf = [0u8; 8];
        let err = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(conn);
        drop(client);
        assert!(guard.admit(tokio::io::duplex(64).1).is_some(), "slot freed");
        assert!(metrics.encode().contains(
            "meshid_transport_refusals_total{listener=\"grpc\",reason=\"idle_timeout\"} 1"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_drain_deadline_every_guarded_connection_fails() {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let hard_stop = drain_deadline(shutdown_rx, Duration::from_secs(3));
        let metrics = ServerMetrics::new();
        let guard = ConnectionGuard::new(
            4,
            Duration::from_secs(3600),
            hard_stop,
            Refusals::register(&metrics),
        );
        let (_client, server) = tokio::io::duplex(64);
        let mut conn = guard.admit(server).expect("slot");
        shutdown_tx.send(true).unwrap();
        let mut buf = [0u8; 8];
        let err = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
