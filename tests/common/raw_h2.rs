//! Hand-written HTTP/2 for abusive clients: just enough framing and HPACK (literal fields only,
//! no Huffman) to break the rules a well-behaved HTTP/2 library enforces, over TLS verified
//! against a given root.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The CreateCertificate path.
pub const CREATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// A TLS connection (ALPN h2) to `addr`, verified as `localhost` against `root_pem`.
pub async fn tls_connect_to(addr: SocketAddr, root_pem: &str) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in meshid::pem::parse_certs(root_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const MAX_FRAME: usize = 16 * 1024;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn hpack_int(prefix_bits: u32, value: usize, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields without indexing (RFC 7541 §6.2.2), no Huffman coding.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(7, name.len(), &mut out);
        out.extend_from_slice(name.as_bytes());
        hpack_int(7, value.len(), &mut out);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// HEADERS (+ CONTINUATION) frames opening a CreateCertificate stream, with `extra` headers.
pub fn open_stream(stream: u32, extra: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (":path", CREATE),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    fields.extend_from_slice(extra);
    let block = header_block(&fields);
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let mut flags = if last { END_HEADERS } else { 0 };
        if i == 0 {
            if end_stream {
                flags |= END_STREAM;
            }
            out.extend(frame(HEADERS, flags, stream, chunk));
        } else {
            out.extend(frame(CONTINUATION, flags, stream, chunk));
        }
    }
    out
}

pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// Sends the preface and an empty SETTINGS, reads the server's SETTINGS and acknowledges it (so
/// that its limits apply). Returns the server's settings as (id, value) pairs.
pub async fn h2_handshake(io: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Vec<(u16, u32)> {
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    loop {
        let f = read_frame(io).await.expect("server SETTINGS");
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            return f
                .payload
                .chunks(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
        }
    }
}

/// A gRPC message frame (5-byte prefix) of `len` zero bytes.
pub fn grpc_message(len: usize) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.resize(5 + len, 0);
    out
}
