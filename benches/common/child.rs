//! The `meshid` binary as a child process on loopback, for the benchmarks that measure it from
//! outside (its RSS, its exit time). A bench includes it with
//! `#[path = "common/child.rs"] mod child;`; not every bench uses every item.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `meshid server`; killed when dropped.
pub struct ChildServer {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The root certificate it created in its CA directory.
    pub root_pem: String,
}

impl ChildServer {
    /// Starts `meshid server` on two free loopback ports with its CA in `ca_dir` and `args`
    /// added; returns once `/readyz` answers 200, and panics when that takes over 30 s.
    pub fn start<S: AsRef<OsStr>>(ca_dir: &Path, args: impl IntoIterator<Item = S>) -> Self {
        let (grpc, http) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_meshid"))
            .arg("server")
            .args(["--listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--ca-dir")
            .arg(ca_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshid binary");
        let started = Instant::now();
        while !ready(http) {
            assert!(started.elapsed() < Duration::from_secs(30), "no start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let root_pem = std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap();
        Self {
            child,
            grpc,
            http,
            root_pem,
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set of process `pid` in MiB, from /proc (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn ready(http: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return false;
    };
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("200 OK")
}
