//! Refusals that HTTP/2 itself (h2, inside hyper) makes, counted from the frames it writes.
//!
//! h2 enforces `SETTINGS_MAX_CONCURRENT_STREAMS` and `SETTINGS_MAX_HEADER_LIST_SIZE` on its own
//! and tells nobody above it: a stream beyond the limit is reset with `REFUSED_STREAM`, and an
//! oversized header list gets a `431` response (or, when its header block spans more
//! CONTINUATION frames than the limit allows, or decodes far beyond it, a `GOAWAY` with
//! `ENHANCE_YOUR_CALM`). No hook of hyper or h2 reports them, and h2's only trace is a debug
//! log line. [`RefusalWatch`] sits between HTTP/2 and TLS and reads the frame headers of what
//! the server writes (payloads are skipped; at most the first few bytes of HEADERS, RST_STREAM
//! and GOAWAY frames are looked at), and counts:
//!
//! - `max_concurrent_streams`: a `RST_STREAM` with `REFUSED_STREAM`;
//! - `header_list_too_large`: a response whose `:status` is not 200 (gRPC answers are always
//!   200, so on this listener only h2's 431 is), or a `GOAWAY` whose debug data is h2's
//!   `too_many_continuations` or `header_list_way_too_large`; also audited, like every
//!   per-request refusal;
//! - `http2_connection_error`: any other `GOAWAY` with an error code.
//!
//! A response's `:status` 200 is always encoded by h2 as the one byte `0x88` (HPACK static
//! table index 8), first in the header block; any other first byte is another status.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use super::Refusals;
use super::ca_service::Peer;
use super::io_wrapper::pass_reads_through;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const REFUSED_STREAM: u32 = 0x7;
/// HPACK: indexed header field 8 of the static table, `:status: 200`.
const STATUS_200: u8 = 0x88;
/// The GOAWAY debug data h2 sends when it refuses an oversized header list.
const HEADER_LIST_GOAWAYS: [&[u8]; 2] = [b"too_many_continuations", b"header_list_way_too_large"];
/// Payload bytes kept of one frame: GOAWAY's 8 fixed bytes plus the longest debug data above.
const CAPTURE: usize = 8 + 25;

/// What the server's HTTP/2 layer refused, as seen in one frame it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Refusal {
    /// A stream reset with `REFUSED_STREAM`.
    StreamRefused,
    /// A `431` response, or a `GOAWAY` for an oversized header block.
    HeaderListTooLarge,
    /// A `GOAWAY` with any other error code.
    ConnectionError,
}

impl H2Refusal {
    /// The `reason` label of `meshid_transport_refusals_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::StreamRefused => "max_concurrent_streams",
            Self::HeaderListTooLarge => "header_list_too_large",
            Self::ConnectionError => "http2_connection_error",
        }
    }
}

/// Reads the HTTP/2 frames a server writes, across arbitrary write boundaries.
#[derive(Debug)]
pub struct ServerFrameScan {
    head: [u8; 9],
    head_len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
    /// Payload bytes of the current frame not yet seen.
    left: usize,
    /// Payload bytes wanted before the frame can be judged (0: judged already).
    want: usize,
    kept: [u8; CAPTURE],
    kept_len: usize,
    /// Streams whose response headers went out and that have not ended: their next HEADERS
    /// frame is trailers. Bounded by the streams open at once.
    responding: HashSet<u32>,
}

impl Default for ServerFrameScan {
    fn default() -> Self {
        Self {
            head: [0; 9],
            head_len: 0,
            kind: 0,
            flags: 0,
            stream: 0,
            left: 0,
            want: 0,
            kept: [0; CAPTURE],
            kept_len: 0,
            responding: HashSet::new(),
        }
    }
}

impl ServerFrameScan {
    /// Feeds bytes the server wrote; calls `found` for every refusal in them.
    pub fn scan(&mut self, mut bytes: &[u8], mut found: impl FnMut(H2Refusal)) {
        while !bytes.is_empty() {
            if self.head_len < self.head.len() {
                let n = (self.head.len() - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == self.head.len() {
                    self.start_frame(&mut found);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.kept_len < self.want {
                let k = (self.want - self.kept_len).min(n);
                self.kept[self.kept_len..self.kept_len + k].copy_from_slice(&bytes[..k]);
                self.kept_len += k;
                if self.kept_len == self.want {
                    self.judge(&mut found);
                }
            }
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.head_len = 0;
            }
        }
    }

    fn start_frame(&mut self, found: &mut impl FnMut(H2Refusal)) {
        let h = self.head;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        self.kind = h[3];
        self.flags = h[4];
        self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        self.left = len;
        self.kept_len = 0;
        let wanted = match self.kind {
            HEADERS => {
                let skip = usize::from(self.flags & PADDED != 0)
                    + if self.flags & PRIORITY != 0 { 5 } else { 0 };
                skip + 1
            }
            RST_STREAM => 4,
            GOAWAY => CAPTURE,
            _ => 0,
        };
        self.want = wanted.min(len);
        if self.want == 0 {
            self.judge(found);
        }
        if len == 0 {
            self.head_len = 0;
        }
    }

    /// Judges the current frame once its first `want` payload bytes are kept.
    fn judge(&mut self, found: &mut impl FnMut(H2Refusal)) {
        let ends = self.flags & END_STREAM != 0;
        let kept = &self.kept[..self.kept_len];
        match self.kind {
            // Trailers: the end of a response whose headers went out earlier.
            HEADERS if ends && self.responding.remove(&self.stream) => {}
            HEADERS if self.responding.contains(&self.stream) => {}
            HEADERS => {
                if kept.last().is_some_and(|first| *first != STATUS_200) {
                    found(H2Refusal::HeaderListTooLarge);
                }
                if !ends {
                    self.responding.insert(self.stream);
                }
            }
            DATA if ends => {
                self.responding.remove(&self.stream);
            }
            RST_STREAM => {
                self.responding.remove(&self.stream);
                if kept == REFUSED_STREAM.to_be_bytes() {
                    found(H2Refusal::StreamRefused);
                }
            }
            GOAWAY if kept.len() >= 8 && kept[4..8] != [0; 4] => {
                let debug = &kept[8..];
                if HEADER_LIST_GOAWAYS.iter().any(|d| debug.starts_with(d)) {
                    found(H2Refusal::HeaderListTooLarge);
                } else {
                    found(H2Refusal::ConnectionError);
                }
            }
            _ => {}
        }
        self.want = 0;
    }
}

/// A server connection whose written HTTP/2 frames are scanned for h2's own refusals, which are
/// counted (and, for oversized header lists, audited). Everything passes through unchanged.
#[derive(Debug)]
pub struct RefusalWatch<T> {
    inner: T,
    scan: ServerFrameScan,
    refusals: Refusals,
    peer: Option<SocketAddr>,
}

impl<T> RefusalWatch<T> {
    /// Watches `inner`, a connection from `peer`, counting into `refusals`.
    pub fn new(inner: T, refusals: Refusals, peer: Option<SocketAddr>) -> Self {
        Self {
            inner,
            scan: ServerFrameScan::default(),
            refusals,
            peer,
        }
    }

    fn saw(&mut self, written: &[u8]) {
        let Self {
            scan,
            refusals,
            peer,
            ..
        } = self;
        scan.scan(written, |refusal| {
            refusals.count(refusal.reason());
            if refusal == H2Refusal::HeaderListTooLarge {
                tracing::warn!(
                    target: "meshid::audit",
                    reason = refusal.reason(),
                    peer = %Peer(*peer),
                    "request refused"
                );
            }
        });
    }
}

pass_reads_through!(RefusalWatch);

impl<T: AsyncWrite + Unpin> AsyncWrite for RefusalWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.saw(&buf[..written]);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut written =
            std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        let total = written;
        for b in bufs {
            if written == 0 {
                break;
            }
            let n = written.min(b.len());
            self.saw(&b[..n]);
            written -= n;
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Everything found in `bytes`, fed `chunk` bytes at a time.
    fn found_in(bytes: &[u8], chunk: usize) -> Vec<H2Refusal> {
        let mut scan = ServerFrameScan::default();
        let mut found = Vec::new();
        for c in bytes.chunks(chunk) {
            scan.scan(c, |r| found.push(r));
        }
        found
    }

    /// A server's writes: SETTINGS, a normal gRPC exchange on stream 1 (headers, data,
    /// trailers), a trailers-only error on 3, a 431 on 5 with its reset, a refused stream 7,
    /// and a GOAWAY for too many CONTINUATION frames.
    fn conversation() -> Vec<u8> {
        let mut out = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        out.extend(frame(HEADERS, 0x4, 1, &[STATUS_200, 0x5f, 0x10]));
        out.extend(frame(DATA, 0, 1, &[0; 300]));
        // Trailers: the first byte is not 0x88 and must not count.
        out.extend(frame(HEADERS, 0x4 | END_STREAM, 1, &[0x40, 0x0b, b'g']));
        out.extend(frame(HEADERS, 0x4 | END_STREAM, 3, &[STATUS_200, 0x40]));
        // 431: literal `:status` with incremental indexing (name index 8), value "431".
        out.extend(frame(
            HEADERS,
            0x4 | END_STREAM,
            5,
            &[0x48, 0x03, b'4', b'3', b'1'],
        ));
        out.extend(frame(RST_STREAM, 0, 5, &1u32.to_be_bytes()));
        out.extend(frame(RST_STREAM, 0, 7, &REFUSED_STREAM.to_be_bytes()));
        let mut goaway = 7u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0xbu32.to_be_bytes());
        goaway.extend_from_slice(b"too_many_continuations");
        out.extend(frame(GOAWAY, 0, 0, &goaway));
        out
    }

    #[test]
    fn a_431_a_refused_stream_and_a_continuation_goaway_are_found_however_the_writes_split() {
        let want = vec![
            H2Refusal::HeaderListTooLarge,
            H2Refusal::StreamRefused,
            H2Refusal::HeaderListTooLarge,
        ];
        let bytes = conversation();
        for chunk in [1, 2, 5, 9, 10, 64, bytes.len()] {
            assert_eq!(found_in(&bytes, chunk), want, "chunks of {chunk}");
        }
    }

    #[test]
    fn ordinary_responses_padded_headers_and_a_clean_goaway_are_not_refusals() {
        let mut out = frame(HEADERS, 0x4 | PADDED, 1, &[2, STATUS_200, 0, 0]);
        out.extend(frame(DATA, END_STREAM, 1, b"x"));
        out.extend(frame(
            HEADERS,
            0x4 | PRIORITY,
            3,
            &[0, 0, 0, 0, 9, STATUS_200],
        ));
        out.extend(frame(HEADERS, 0x4 | END_STREAM, 3, &[0x40]));
        out.extend(frame(RST_STREAM, 0, 9, &8u32.to_be_bytes())); // CANCEL
        out.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]));
        assert_eq!(found_in(&out, 3), vec![]);
        let mut other = 0u32.to_be_bytes().to_vec();
        other.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            found_in(&frame(GOAWAY, 0, 0, &other), 4),
            vec![H2Refusal::ConnectionError]
        );
    }

    #[test]
    fn a_finished_stream_is_forgotten() {
        let mut scan = ServerFrameScan::default();
        let mut out = frame(HEADERS, 0x4, 1, &[STATUS_200]);
        out.extend(frame(HEADERS, 0x4 | END_STREAM, 1, &[0x40]));
        out.extend(frame(HEADERS, 0x4, 3, &[STATUS_200]));
        out.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
        scan.scan(&out, |r| panic!("{r:?}"));
        assert!(scan.responding.is_empty());
    }
}
