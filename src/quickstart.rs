//! `meshid quickstart`: a local root, the server on loopback, and one real CreateCertificate
//! round trip over TLS, printed as a readable summary. No cluster, no cloud.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::agent::CaClient;
use crate::app::start_server;
use crate::config::ServerArgs;
use crate::identity::SpiffeId;
use crate::svid::{Svid, WorkloadKeyType, generate_csr};

/// Options for the quickstart.
#[derive(Debug, Clone, clap::Args)]
pub struct QuickstartArgs {
    /// Directory for the generated root and token file (a temporary one when unset).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Namespace of the demo workload.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Service account of the demo workload.
    #[arg(long, default_value = "quickstart")]
    pub service_account: String,
    /// Key type of the demo workload.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    pub key_type: WorkloadKeyType,
}

/// Something in the quickstart failed; the message says what.
#[derive(Debug, thiserror::Error)]
#[error("quickstart: {0}")]
pub struct QuickstartError(String);

fn err(e: impl std::fmt::Display) -> QuickstartError {
    QuickstartError(e.to_string())
}

/// Runs the quickstart and returns the summary text it printed.
pub async fn run(args: QuickstartArgs) -> Result<String, QuickstartError> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("meshid-quickstart")
                .tempdir()
                .map_err(err)?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let token = hex::encode(rand::random::<[u8; 24]>());
    let token_file = dir.join("tokens.csv");
    std::fs::write(
        &token_file,
        format!("{token},{},{}\n", args.namespace, args.service_account),
    )
    .map_err(err)?;
    let server_args = ServerArgs {
        listen: Some("127.0.0.1:0".parse().map_err(err)?),
        http_listen: Some("127.0.0.1:0".parse().map_err(err)?),
        ca_dir: Some(dir.join("ca")),
        static_tokens: Some(token_file),
        serving_hosts: Some(vec!["localhost".into(), "127.0.0.1".into()]),
        ..Default::default()
    };
    let cfg = server_args.validate().map_err(err)?;
    let trust_domain = cfg.trust_domain.clone();
    let cluster_id = cfg.cluster_id.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = start_server(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .map_err(err)?;

    let identity =
        SpiffeId::for_service_account(&trust_domain, &args.namespace, &args.service_account)
            .map_err(err)?;
    let client = CaClient::new(
        &format!("https://{}", server.grpc_addr),
        &server.root_pem,
        Some("localhost"),
        Some(cluster_id),
    )
    .map_err(err)?;
    let started = Instant::now();
    let (key, csr) = generate_csr(&identity, args.key_type).map_err(err)?;
    let chain = client
        .create_certificate(&csr, &token, Duration::from_secs(3600), None)
        .await
        .map_err(err)?;
    let elapsed = started.elapsed();
    // Validated against the root the server started with, not the roots it returned.
    let trusted = crate::trust::TrustBundle::from_pem(&server.root_pem).map_err(err)?;
    let svid = Svid::from_response(&chain, &key, &identity, &trusted, OffsetDateTime::now_utc())
        .map_err(err)?;
    std::fs::write(dir.join("cert-chain.pem"), &svid.chain_pem).map_err(err)?;
    std::fs::write(dir.join("root-cert.pem"), &svid.roots_pem).map_err(err)?;
    let kept = args.dir.is_some().then_some(dir.as_path());
    let summary = summarize(
        &svid,
        chain.len(),
        elapsed,
        &server.grpc_addr.to_string(),
        kept,
    )?;
    let _ = stop_tx.send(());
    server.wait().await.map_err(err)?;
    Ok(summary)
}

fn summarize(
    svid: &Svid,
    elements: usize,
    elapsed: Duration,
    addr: &str,
    kept_dir: Option<&std::path::Path>,
) -> Result<String, QuickstartError> {
    use time::format_description::well_known::Rfc3339;
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    let ders = crate::pem::parse_certs(&svid.chain_pem).map_err(err)?;
    let (_, leaf) = X509Certificate::from_der(ders[0].as_ref()).map_err(err)?;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "meshid server on https://{addr} issued an SVID in {} ms",
        elapsed.as_millis()
    ));
    line(format!("  identity     {}", svid.identity));
    let subject = leaf.subject().to_string();
    line(format!(
        "  subject      {}",
        if subject.is_empty() {
            "(empty)"
        } else {
            &subject
        }
    ));
    line(format!("  issuer       {}", leaf.issuer()));
    line(format!("  serial       {}", svid.serial_hex));
    line(format!(
        "  valid        {} .. {}",
        fmt(svid.not_before),
        fmt(svid.not_after)
    ));
    for ext in leaf.extensions() {
        let crit = if ext.critical { " (critical)" } else { "" };
        let text = match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                format!(
                    "subjectAltName{crit}: {}",
                    san.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            ParsedExtension::KeyUsage(ku) => format!("keyUsage{crit}: {ku}"),
            ParsedExtension::ExtendedKeyUsage(eku) => format!(
                "extendedKeyUsage{crit}: {}{}",
                if eku.server_auth { "serverAuth " } else { "" },
                if eku.client_auth { "clientAuth" } else { "" }
            ),
            ParsedExtension::BasicConstraints(bc) => {
                format!("basicConstraints{crit}: CA:{}", bc.ca)
            }
            ParsedExtension::SubjectKeyIdentifier(_) => format!("subjectKeyIdentifier{crit}"),
            ParsedExtension::AuthorityKeyIdentifier(_) => format!("authorityKeyIdentifier{crit}"),
            _ => format!("{}{crit}", ext.oid),
        };
        line(format!("  extension    {text}"));
    }
    line(format!(
        "  chain        {elements} elements (leaf, root bundle); verified against the root"
    ));
    match kept_dir {
        Some(dir) => line(format!(
            "  files        {}/{{cert-chain.pem,root-cert.pem,ca/}}",
            dir.display()
        )),
        None => line(
            "  files        (temporary; pass --dir DIR to keep the root, chain and token file)"
                .into(),
        ),
    }
    Ok(out)
}
