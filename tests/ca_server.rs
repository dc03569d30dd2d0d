//! meshid server end to end: a real server over TLS on 127.0.0.1, authenticating real
//! service-account tokens with TokenReview on the kube-apiserver harness
//! (`tests/kube-harness/run.sh up`). Issued certificates are cross-checked with openssl.
//!
//! Skipped when MESHID_TEST_KUBECONFIG is unset (fails instead under CI=true).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::kube::{Harness, TokenOptions, harness};
use common::meshid::{
    http_get, metric_value, openssl, openssl_csr, openssl_key, write_token_kubeconfig,
};
use common::proxy::TcpProxy;
use meshid::app::{ServerHandle, start_server};
use meshid::config::ServerArgs;
use meshid::proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const CLUSTER: &str = "test-cluster";
const TD: &str = "cluster.local";

/// A server authenticating as its own service account (allowed to create TokenReviews), and a
/// workload service account `web` in a fresh namespace.
struct Fixture {
    harness: Harness,
    ns: String,
    dir: tempfile::TempDir,
    server: ServerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fixture {
    async fn new(h: Harness) -> Self {
        Self::build(h, None, true).await
    }

    /// `apiserver` overrides the URL meshid uses; `may_review` grants its service account
    /// `create tokenreviews`.
    async fn build(h: Harness, apiserver: Option<&str>, may_review: bool) -> Self {
        Self::build_with(h, apiserver, may_review, |_, _| {}).await
    }

    /// Like [`Self::build`], with `tweak` adjusting the server's settings (it gets the
    /// namespace too).
    async fn build_with(
        h: Harness,
        apiserver: Option<&str>,
        may_review: bool,
        tweak: impl FnOnce(&mut ServerArgs, &str),
    ) -> Self {
        let ns = h.create_namespace("ca").await.unwrap();
        h.create_service_account(&ns, "meshid").await.unwrap();
        h.create_service_account(&ns, "web").await.unwrap();
        if may_review {
            h.grant_token_review(&ns, "meshid").await.unwrap();
        }
        let server_token = h
            .request_token(&ns, "meshid", &TokenOptions::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        write_token_kubeconfig(&h, &server_token, apiserver, &kubeconfig);
        let args = ServerArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            http_listen: Some("127.0.0.1:0".parse().unwrap()),
            ca_dir: Some(dir.path().join("ca")),
            kubeconfig: Some(kubeconfig),
            cluster_id: Some(CLUSTER.into()),
            root_configmap: Some(false),
            serving_hosts: Some(vec!["meshid.meshid-system.svc".into(), "localhost".into()]),
            ..Default::default()
        };
        let mut args = args;
        tweak(&mut args, &ns);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = start_server(args.validate().unwrap(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        Fixture {
            harness: h,
            ns,
            dir,
            server,
            stop: Some(tx),
        }
    }

    /// A ztunnel-shaped request for `sa`'s own identity: a fresh P-256 key, empty subject,
    /// the SPIFFE ID as the only (URI) SAN.
    fn ec_csr(&self, sa: &str) -> String {
        let key = openssl_key(self.dir.path(), "k", "ec");
        openssl_csr(
            &key,
            "/",
            &[&format!("subjectAltName=URI:{}", self.identity(sa))],
        )
    }

    fn identity(&self, sa: &str) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{sa}", self.ns)
    }

    async fn token(&self, sa: &str) -> String {
        self.harness
            .request_token(&self.ns, sa, &TokenOptions::for_audiences(["istio-ca"]))
            .await
            .unwrap()
    }

    /// A TLS channel to the gRPC endpoint, verifying the serving certificate against the root.
    async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server.root_pem))
            .domain_name("meshid.meshid-system.svc");
        Endpoint::from_shared(format!("https://{}", self.server.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Calls CreateCertificate with optional bearer token and clusterid headers.
    async fn call(
        &self,
        csr: &str,
        token: Option<&str>,
        cluster: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        self.call_on(&self.channel().await, csr, token, cluster, None)
            .await
    }

    /// Calls CreateCertificate on `channel`, optionally with `ImpersonatedIdentity`.
    async fn call_on(
        &self,
        channel: &Channel,
        csr: &str,
        token: Option<&str>,
        cluster: Option<&str>,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let metadata = impersonate.map(|target| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(target.to_owned())),
                },
            )]
            .into(),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_owned(),
            validity_duration: 3600,
            metadata,
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(c) = cluster {
            req.metadata_mut().insert("clusterid", c.parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel.clone())
            .create_certificate(req)
            .await
            .map(|r| r.into_inner().cert_chain)
    }

    async fn metrics(&self) -> String {
        let addr = self.server.http_addr;
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
            .await
            .unwrap()
    }

    /// TokenReviews meshid made, whatever their result (`meshid_tokenreviews_total`).
    async fn tokenreviews(&self) -> u64 {
        let m = self.metrics().await;
        ["authenticated", "unauthenticated", "error"]
            .iter()
            .map(|r| metric_value(&m, &format!("meshid_tokenreviews_total{{result=\"{r}\"}}")))
            .sum()
    }

    async fn rejected(&self, reason: &str) -> u64 {
        metric_value(
            &self.metrics().await,
            &format!(
                "meshid_certificate_requests_total{{outcome=\"rejected\",reason=\"{reason}\"}}"
            ),
        )
    }

    async fn issued_count(&self) -> u64 {
        metric_value(
            &self.metrics().await,
            "meshid_certificate_requests_total{outcome=\"issued\",reason=\"none\"}",
        )
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.server.wait().await.unwrap();
    }
}

/// Checks a returned chain with openssl: verifies against the root element and returns the
/// leaf's text form.
fn verify_with_openssl(dir: &Path, chain: &[String]) -> String {
    assert_eq!(chain.len(), 2, "leaf + root bundle");
    let leaf = dir.join("leaf.pem");
    let root = dir.join("root.pem");
    std::fs::write(&leaf, &chain[0]).unwrap();
    std::fs::write(&root, &chain[1]).unwrap();
    let out = openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out).trim_end().ends_with(": OK"));
    String::from_utf8(openssl(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        leaf.to_str().unwrap(),
    ]))
    .unwrap()
}

/// The leaf's extensions are exactly ours; keyEncipherment only for an RSA key (RFC 5480, 8410).
fn assert_exact_extensions(text: &str, identity: &str, rsa: bool) {
    let ext_lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("X509v3 ") && *l != "X509v3 extensions:")
        .collect();
    assert_eq!(
        ext_lines,
        vec![
            "X509v3 Authority Key Identifier:",
            "X509v3 Subject Alternative Name: critical",
            "X509v3 Key Usage: critical",
            "X509v3 Extended Key Usage:",
            "X509v3 Subject Key Identifier:",
            "X509v3 Basic Constraints: critical",
        ],
        "{text}"
    );
    assert!(text.contains(&format!("URI:{identity}\n")), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert_eq!(text.contains("Key Encipherment"), rsa, "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        !text.contains("DNS:") && !text.contains("IP Address:"),
        "{text}"
    );
}

fn pubkey_of(path_or_pem: &str, is_cert: bool, dir: &Path) -> Vec<u8> {
    if is_cert {
        let f = dir.join("pk-cert.pem");
        std::fs::write(&f, path_or_pem).unwrap();
        openssl(&["x509", "-noout", "-pubkey", "-in", f.to_str().unwrap()])
    } else {
        openssl(&["pkey", "-pubout", "-in", path_or_pem])
    }
}

#[tokio::test]
async fn a_sidecar_shaped_rsa_csr_with_a_critical_san_gets_a_certificate_openssl_verifies() {
    let f = Fixture::new(harness!()).await;
    let dir = f.dir.path();
    let key = openssl_key(dir, "sidecar", "rsa:2048");
    let csr = openssl_csr(
        &key,
        "/O=",
        &[&format!(
            "subjectAltName=critical,URI:{}",
            f.identity("web")
        )],
    );
    let token = f.token("web").await;
    let chain = f
        .call(&csr, Some(&token), Some(CLUSTER))
        .await
        .expect("issued");
    let text = verify_with_openssl(dir, &chain);
    assert_exact_extensions(&text, &f.identity("web"), true);
    assert_eq!(
        pubkey_of(&chain[0], true, dir),
        pubkey_of(key.to_str().unwrap(), false, dir)
    );
    assert!(
        text.contains("Subject: \n") || text.contains("Subject:\n") || text.contains("Subject: \r"),
        "{text}"
    );
    f.stop().await;
}

#[tokio::test]
async fn a_ztunnel_shaped_p256_csr_without_subject_and_a_non_critical_san_gets_a_certificate() {
    let f = Fixture::new(harness!()).await;
    let dir = f.dir.path();
    let key = openssl_key(dir, "ztunnel", "ec");
    let csr = openssl_csr(
        &key,
        "/",
        &[&format!("subjectAltName=URI:{}", f.identity("web"))],
    );
    let token = f.token("web").await;
    // ztunnel sends no clusterid header when unset: that is accepted too.
    let chain = f.call(&csr, Some(&token), None).await.expect("issued");
    let text = verify_with_openssl(dir, &chain);
    // Our leaf marks the SAN critical (empty subject) whatever the CSR said.
    assert_exact_extensions(&text, &f.identity("web"), false);
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
    // The same token again is served from the TokenReview cache.
    f.call(&csr, Some(&token), None)
        .await
        .expect("issued again");
    let metrics = f.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "meshid_token_cache_lookups_total{result=\"hit_positive\"}"
        ) >= 1,
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "meshid_tokenreviews_total{result=\"authenticated\"}"
        ),
        1,
        "{metrics}"
    );
    f.stop().await;
}

#[tokio::test]
async fn every_bad_request_is_refused_with_the_right_status_and_no_certificate_is_issued() {
    let f = Fixture::new(harness!()).await;
    let dir = f.dir.path();
    let me = f.identity("web");
    let ec = openssl_key(dir, "ec", "ec");
    let good = openssl_csr(&ec, "/", &[&format!("subjectAltName=URI:{me}")]);
    let token = f.token("web").await;
    let other_audience = f
        .harness
        .request_token(
            &f.ns,
            "web",
            &TokenOptions::for_audiences(["some-other-service"]),
        )
        .await
        .unwrap();
    let expired = f
        .harness
        .resign_token(&token, |claims| {
            let past = common::kube::unix_now() - 3600;
            claims.insert("exp".into(), past.into());
            claims.insert("nbf".into(), (past - 600).into());
            claims.insert("iat".into(), (past - 600).into());
        })
        .unwrap();
    let mut tampered = {
        use base64::Engine;
        let b64: String = good.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    };
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered = {
        use base64::Engine;
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&tampered)
        )
    };
    let rsa1024 = openssl_key(dir, "weak", "rsa:1024");
    // (what, csr, bearer token, clusterid header, expected status)
    type Case<'a> = (&'a str, String, Option<&'a str>, Option<&'a str>, Code);
    let cases: Vec<Case> = vec![
        (
            "another identity's SAN",
            openssl_csr(
                &ec,
                "/",
                &[&format!("subjectAltName=URI:{}", f.identity("admin"))],
            ),
            Some(&token),
            None,
            Code::PermissionDenied,
        ),
        (
            "an extra DNS SAN",
            openssl_csr(
                &ec,
                "/",
                &[&format!("subjectAltName=URI:{me},DNS:evil.example")],
            ),
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "a CA:true request",
            openssl_csr(
                &ec,
                "/",
                &[
                    &format!("subjectAltName=URI:{me}"),
                    "basicConstraints=critical,CA:TRUE",
                ],
            ),
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "a bad signature",
            tampered,
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "an RSA-1024 key",
            openssl_csr(&rsa1024, "/", &[&format!("subjectAltName=URI:{me}")]),
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "garbage PEM",
            "-----BEGIN CERTIFICATE REQUEST-----\n!!\n".into(),
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "an empty CSR",
            String::new(),
            Some(&token),
            None,
            Code::InvalidArgument,
        ),
        (
            "a token for another audience",
            good.clone(),
            Some(&other_audience),
            None,
            Code::Unauthenticated,
        ),
        (
            "an expired token",
            good.clone(),
            Some(&expired),
            None,
            Code::Unauthenticated,
        ),
        (
            "no authorization header",
            good.clone(),
            None,
            None,
            Code::Unauthenticated,
        ),
        (
            "a wrong clusterid",
            good.clone(),
            Some(&token),
            Some("other-cluster"),
            Code::PermissionDenied,
        ),
    ];
    for (what, csr, token, cluster, code) in cases {
        let status = f.call(&csr, token, cluster).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            !status.message().contains("127.0.0.1"),
            "{what}: leaks backend detail: {status:?}"
        );
    }
    assert_eq!(
        f.issued_count().await,
        0,
        "no certificate may be issued for a refused request"
    );
    // The same server still issues for a good request.
    f.call(&good, Some(&token), None)
        .await
        .expect("good request");
    assert_eq!(f.issued_count().await, 1);
    f.stop().await;
}

#[tokio::test]
async fn a_token_bound_to_a_deleted_pod_is_refused() {
    let f = Fixture::new(harness!()).await;
    let pod = f
        .harness
        .create_pod(&f.ns, "web-0", "web", "node-a")
        .await
        .unwrap();
    let token = f
        .harness
        .request_token(
            &f.ns,
            "web",
            &TokenOptions::for_audiences(["istio-ca"]).bound_to(&pod),
        )
        .await
        .unwrap();
    let csr = f.ec_csr("web");
    f.harness.delete_pod(&f.ns, "web-0").await.unwrap();
    let status = f
        .call(&csr, Some(&token), None)
        .await
        .expect_err("deleted pod");
    assert_eq!(status.code(), Code::Unauthenticated);
    f.stop().await;
}

#[tokio::test]
async fn an_unreachable_apiserver_fails_closed_with_unavailable() {
    let h = harness!();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = Fixture::build(h, Some(&format!("https://127.0.0.1:{port}")), true).await;
    let csr = f.ec_csr("web");
    let token = f.token("web").await;
    let status = f
        .call(&csr, Some(&token), None)
        .await
        .expect_err("apiserver down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(f.issued_count().await, 0);
    f.stop().await;
}

#[tokio::test]
async fn a_server_whose_service_account_may_not_create_tokenreviews_fails_closed() {
    let f = Fixture::build(harness!(), None, false).await;
    let csr = f.ec_csr("web");
    let token = f.token("web").await;
    let status = f
        .call(&csr, Some(&token), None)
        .await
        .expect_err("forbidden TokenReview");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    f.stop().await;
}

#[tokio::test]
async fn probes_report_ready_and_the_server_drains_on_shutdown() {
    let f = Fixture::new(harness!()).await;
    let addr = f.server.http_addr;
    let ready = tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
        .await
        .unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let healthy = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
        .await
        .unwrap();
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    let metrics = f.metrics().await;
    assert!(
        metrics.contains("meshid_certificate_expiry_timestamp_seconds{cert=\"root\"}"),
        "{metrics}"
    );
    let grpc = f.server.grpc_addr;
    f.stop().await;
    assert!(
        std::net::TcpStream::connect_timeout(&grpc, Duration::from_secs(1)).is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn the_grpc_endpoint_answers_health_checks_and_unknown_methods_with_unimplemented() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let f = Fixture::new(harness!()).await;
    let channel = f.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "istio.v1.auth.IstioCertificateService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    // A method the CA service lacks, and a service the endpoint does not serve.
    for path in [
        "/istio.v1.auth.IstioCertificateService/DeleteCertificate",
        "/no.such.Service/Call",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(IstioCertificateRequest::default()),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateRequest>::default(),
            )
            .await
            .expect_err("unimplemented");
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
    }
    assert_eq!(f.issued_count().await, 0);
    f.stop().await;
}

/// The harness apiserver's address, for a proxy in front of it.
fn apiserver_addr(h: &Harness) -> std::net::SocketAddr {
    let url = &h.config().cluster_url;
    format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap())
        .parse()
        .unwrap()
}

/// `meshid_tokenreviews_total` (summed over results) counts the TokenReviews meshid sends; the
/// apiserver itself exports no per-client count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_with_one_new_token_make_exactly_one_tokenreview() {
    let h = harness!();
    let proxy = TcpProxy::start(apiserver_addr(&h)).await;
    // 500 certificates for one identity: without the issuance rate limit, which is not the
    // subject here (and would refuse all but 20).
    let f = Fixture::build_with(h, Some(&proxy.url()), true, |args, _| {
        args.issuance_burst = Some(0)
    })
    .await;
    let csr = f.ec_csr("web");
    let token = f.token("web").await;
    let channels = futures::future::join_all((0..4).map(|_| f.channel())).await;
    let calls = (0..500).map(|i| f.call_on(&channels[i % 4], &csr, Some(&token), None, None));
    let results = futures::future::join_all(calls).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed[0]
    );
    assert_eq!(f.issued_count().await, 500);
    assert_eq!(f.tokenreviews().await, 1);
    // One review in flight at a time needs one apiserver connection.
    assert_eq!(proxy.peak_open(), 1, "apiserver connections");
    f.stop().await;
}

#[tokio::test]
async fn junk_tokens_are_refused_without_a_tokenreview_and_a_good_one_still_gets_a_certificate() {
    let f = Fixture::new(harness!()).await;
    let csr = f.ec_csr("web");
    let good = f.token("web").await;
    let expired = f
        .harness
        .resign_token(&good, |claims| {
            claims.insert("exp".into(), (common::kube::unix_now() - 3600).into());
        })
        .unwrap();
    let other_audience = f
        .harness
        .request_token(&f.ns, "web", &TokenOptions::default())
        .await
        .unwrap();
    let alg_none = {
        let (_, rest) = good.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        use base64::Engine as _;
        let none = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        format!("{none}.{payload}.c2ln")
    };
    let junk = [
        "junk".to_owned(),
        "a.b.c".to_owned(),
        format!("{good}x.y"),
        alg_none,
        expired,
        other_audience,
        // One byte over the pre-check's size limit.
        format!(
            "{good}.{}",
            "A".repeat(meshid::authn::MAX_TOKEN_BYTES - good.len())
        ),
    ];
    for token in &junk {
        let status = f
            .call(&csr, Some(token), None)
            .await
            .expect_err("junk token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    assert_eq!(
        f.tokenreviews().await,
        0,
        "no junk token reached the apiserver"
    );
    f.call(&csr, Some(&good), None).await.expect("good token");
    assert_eq!(f.tokenreviews().await, 1);
    f.stop().await;
}

#[tokio::test]
async fn a_pod_bound_token_is_refused_within_15_seconds_of_its_pods_deletion() {
    // Polls every 250ms for up to 15s: without the issuance rate limit, not the subject here.
    let f = Fixture::build_with(harness!(), None, true, |args, _| {
        args.issuance_burst = Some(0)
    })
    .await;
    let pod = f
        .harness
        .create_pod(&f.ns, "web-0", "web", "node-a")
        .await
        .unwrap();
    let token = f
        .harness
        .request_token(
            &f.ns,
            "web",
            &TokenOptions::for_audiences(["istio-ca"]).bound_to(&pod),
        )
        .await
        .unwrap();
    let csr = f.ec_csr("web");
    // Accepted, and cached, while the pod exists.
    f.call(&csr, Some(&token), None).await.expect("pod exists");
    f.call(&csr, Some(&token), None).await.expect("pod exists");
    let deleted = std::time::Instant::now();
    f.harness.delete_pod(&f.ns, "web-0").await.unwrap();
    let refused_after = loop {
        match f.call(&csr, Some(&token), None).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                break deleted.elapsed();
            }
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(15),
            "still issuing 15 s after the pod was deleted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("refused {refused_after:?} after the pod's deletion");
    f.stop().await;
}

#[tokio::test]
async fn an_apiserver_outage_during_node_authorization_is_unavailable_and_service_resumes_after_it()
{
    let h = harness!();
    let proxy = TcpProxy::start(apiserver_addr(&h)).await;
    let f = Fixture::build_with(h, Some(&proxy.url()), true, |args, ns| {
        args.trusted_node_accounts = Some(vec![format!("{ns}/ztunnel")]);
        // The ztunnel's token stays cached through the outage: only node authorization
        // needs the apiserver then.
        args.pod_token_cache_ttl = Some("120s".into());
    })
    .await;
    let (h, ns) = (&f.harness, &f.ns);
    h.grant_cluster_role(
        "meshid-test:pod-reader",
        vec![common::kube::rule("", "pods", &["get", "list"])],
        ns,
        "meshid",
    )
    .await
    .unwrap();
    for sa in ["ztunnel", "db"] {
        h.create_service_account(ns, sa).await.unwrap();
    }
    let zt_pod = h
        .create_pod(ns, "ztunnel-a", "ztunnel", "node-a")
        .await
        .unwrap();
    h.create_pod(ns, "web-1", "web", "node-a").await.unwrap();
    h.create_pod(ns, "db-1", "db", "node-a").await.unwrap();
    let zt_token = h
        .request_token(
            ns,
            "ztunnel",
            &TokenOptions::for_audiences(["istio-ca"]).bound_to(&zt_pod),
        )
        .await
        .unwrap();
    let channel = f.channel().await;
    let (web, db) = (f.identity("web"), f.identity("db"));
    // RBAC reaches the apiserver's authorizer through a watch: retry until it has.
    let web_csr = f.ec_csr("web");
    common::kube::eventually(Duration::from_secs(10), || async {
        f.call_on(&channel, &web_csr, Some(&zt_token), None, Some(&web))
            .await
            .map_err(|s| anyhow::anyhow!("{s:?}"))
    })
    .await
    .expect("web runs on ztunnel's node");

    let unavailable_before = f.rejected("impersonation_unavailable").await;
    proxy.cut();
    // db's placement is not cached yet, so authorizing it needs the apiserver.
    let status = f
        .call_on(&channel, &f.ec_csr("db"), Some(&zt_token), None, Some(&db))
        .await
        .expect_err("apiserver down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        f.rejected("impersonation_unavailable").await,
        unavailable_before + 1
    );
    assert_eq!(f.rejected("impersonation_denied").await, 0);

    proxy.restore();
    f.call_on(&channel, &f.ec_csr("db"), Some(&zt_token), None, Some(&db))
        .await
        .expect("served again once the apiserver is back");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_tokens_beyond_the_apiserver_bound_gets_unavailable_while_a_cached_caller_is_served()
 {
    let f = Fixture::build_with(harness!(), None, true, |args, _| {
        args.apiserver_concurrency = Some(1);
        args.apiserver_queue = Some(1);
        // The subject is the apiserver bound, not the issuance rate limit.
        args.issuance_burst = Some(0);
    })
    .await;
    let csr = f.ec_csr("web");
    let regular = f.token("web").await;
    f.call(&csr, Some(&regular), None)
        .await
        .expect("the regular caller, now cached");
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(f.token("web").await);
    }
    let channel = f.channel().await;
    let flood_calls = futures::future::join_all(
        flood
            .iter()
            .map(|t| f.call_on(&channel, &csr, Some(t), None, None)),
    );
    let regular_call = f.call_on(&channel, &csr, Some(&regular), None, None);
    let (flooded, regular_result) = tokio::join!(flood_calls, regular_call);
    regular_result.expect("a cached caller needs no apiserver call and is served");
    let refused: Vec<_> = flooded.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !refused.is_empty(),
        "100 new tokens at once overflow a bound of 1 + 1"
    );
    for status in &refused {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(f.rejected("authn_overloaded").await, refused.len() as u64);
    assert_eq!(
        metric_value(&f.metrics().await, "meshid_apiserver_calls_refused_total"),
        refused.len() as u64
    );
    // The bound releases: a new token is reviewed again afterwards.
    let later = f.token("web").await;
    f.call(&csr, Some(&later), None)
        .await
        .expect("served once the flood is over");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_gets_its_first_certificate_at_once_while_another_pod_of_its_identity_is_rate_limited()
 {
    let f = Fixture::new(harness!()).await;
    let bound = |pod| TokenOptions::for_audiences(["istio-ca"]).bound_to(pod);
    let first = f
        .harness
        .create_pod(&f.ns, "web-1", "web", "node-a")
        .await
        .unwrap();
    let token = f
        .harness
        .request_token(&f.ns, "web", &bound(&first))
        .await
        .unwrap();
    let csr = f.ec_csr("web");
    // The first pod loops on CreateCertificate until the limit (20 at once by default) bites.
    let mut issued = 0u64;
    let refusal = loop {
        match f.call(&csr, Some(&token), None).await {
            Ok(_) => issued += 1,
            Err(status) => break status,
        }
        assert!(issued <= 1000, "never limited after {issued} certificates");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(issued >= 20, "the burst was served: {issued}");

    // The next replica of the same identity (a rollout) starts with a full bucket of its own.
    let second = f
        .harness
        .create_pod(&f.ns, "web-2", "web", "node-a")
        .await
        .unwrap();
    let token = f
        .harness
        .request_token(&f.ns, "web", &bound(&second))
        .await
        .unwrap();
    f.call(&csr, Some(&token), None)
        .await
        .expect("a new pod's first certificate is not delayed");
    f.stop().await;
}
