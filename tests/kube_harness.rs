//! The Kubernetes behaviour meshid's CA relies on, checked against a real
//! kube-apiserver (`tests/kube-harness/run.sh up`): TokenRequest, TokenReview
//! with audiences, expiry, pod binding, and RBAC on TokenReview itself.
//!
//! Skipped when MESHID_TEST_KUBECONFIG is unset (fails instead under CI=true).
// Needs the server role, which the agent-only build (`--no-default-features`) leaves out.
#![cfg(feature = "server")]

mod common;

use std::time::{Duration, Instant};

use common::kube::{TokenOptions, api_status_code, eventually, harness, review_token, unix_now};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;

const CA_AUDIENCE: &str = "istio-ca";
const NODE: &str = "node-a";

fn username(status: &TokenReviewStatus) -> Option<&str> {
    status.user.as_ref()?.username.as_deref()
}

fn extra<'a>(status: &'a TokenReviewStatus, key: &str) -> Option<&'a [String]> {
    status
        .user
        .as_ref()?
        .extra
        .as_ref()?
        .get(key)
        .map(Vec::as_slice)
}

fn authenticated(status: &TokenReviewStatus) -> bool {
    status.authenticated == Some(true)
}

/// Asserts a review failed for the given reason (a fragment of the
/// apiserver's message, which is stable within the pinned release).
#[track_caller]
fn assert_rejected_because(status: &TokenReviewStatus, reason: &str) {
    assert!(!authenticated(status), "{status:?}");
    let error = status.error.as_deref().unwrap_or_default();
    assert!(error.contains(reason), "expected {reason:?} in {error:?}");
}

#[tokio::test]
async fn a_token_minted_for_a_service_account_is_authenticated_by_token_review() {
    let h = harness!();
    let (ns, token) = h
        .service_account_token(
            "authn",
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).expiring_in(600),
        )
        .await
        .unwrap();

    let status = review_token(&h.admin_client(), &token, &[CA_AUDIENCE])
        .await
        .unwrap();

    assert!(authenticated(&status), "{status:?}");
    assert_eq!(
        username(&status),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    assert_eq!(
        status.audiences.as_deref(),
        Some([CA_AUDIENCE.to_owned()].as_slice())
    );
    let groups = status
        .user
        .as_ref()
        .and_then(|u| u.groups.clone())
        .unwrap_or_default();
    assert!(
        groups.contains(&format!("system:serviceaccounts:{ns}")),
        "{groups:?}"
    );
    assert_eq!(
        extra(&status, "authentication.kubernetes.io/pod-name"),
        None
    );
}

#[tokio::test]
async fn a_token_for_another_audience_is_unauthenticated_for_the_ca_audience() {
    let h = harness!();
    let (_, token) = h
        .service_account_token(
            "audience",
            "workload",
            &TokenOptions::for_audiences(["some-other-service"]),
        )
        .await
        .unwrap();

    let status = review_token(&h.admin_client(), &token, &[CA_AUDIENCE])
        .await
        .unwrap();

    assert_rejected_because(&status, "is invalid for the target audiences");
    assert_eq!(username(&status), None, "{status:?}");
    // The same token is fine for the audience it was minted for.
    let status = review_token(&h.admin_client(), &token, &["some-other-service"])
        .await
        .unwrap();
    assert!(authenticated(&status), "{status:?}");
}

#[tokio::test]
async fn a_token_with_the_apiserver_audience_is_unauthenticated_for_the_ca_audience() {
    let h = harness!();
    let ns = h.create_namespace("default-aud").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();
    // No audiences: the apiserver's own (--api-audiences).
    let token = h
        .request_token(&ns, "workload", &TokenOptions::default())
        .await
        .unwrap();

    let for_ca = review_token(&h.admin_client(), &token, &[CA_AUDIENCE])
        .await
        .unwrap();
    let for_apiserver = review_token(&h.admin_client(), &token, &[]).await.unwrap();

    assert_rejected_because(&for_ca, "is invalid for the target audiences");
    assert!(authenticated(&for_apiserver), "{for_apiserver:?}");
}

#[tokio::test]
async fn an_expired_token_is_unauthenticated() {
    let h = harness!();
    let (_, token) = h
        .service_account_token(
            "expired",
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).expiring_in(600),
        )
        .await
        .unwrap();
    // TokenRequest won't mint for less than 600 s, so move the genuine token's
    // validity window into the past (beyond the validator's 60 s leeway) and
    // sign it again with the apiserver's key.
    let now = unix_now();
    let expired = h
        .resign_token(&token, |claims| {
            claims.insert("iat".into(), (now - 3600).into());
            claims.insert("nbf".into(), (now - 3600).into());
            claims.insert("exp".into(), (now - 3000).into());
        })
        .unwrap();
    // Control: re-signing with the claims unchanged yields a valid token, so
    // the expiry alone is what the apiserver rejects below.
    let resigned = h.resign_token(&token, |_| {}).unwrap();
    let control = review_token(&h.admin_client(), &resigned, &[CA_AUDIENCE])
        .await
        .unwrap();
    assert!(
        authenticated(&control),
        "re-signed token should be valid: {control:?}"
    );

    let status = review_token(&h.admin_client(), &expired, &[CA_AUDIENCE])
        .await
        .unwrap();

    assert_rejected_because(&status, "service account token has expired");
}

#[tokio::test]
async fn a_pod_bound_token_carries_the_pod_name_and_uid_in_its_extras() {
    let h = harness!();
    let ns = h.create_namespace("bound").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();
    let pod = h.create_pod(&ns, "app-0", "workload", NODE).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let token = h
        .request_token(
            &ns,
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).bound_to(&pod),
        )
        .await
        .unwrap();

    let status = review_token(&h.admin_client(), &token, &[CA_AUDIENCE])
        .await
        .unwrap();

    assert!(authenticated(&status), "{status:?}");
    assert_eq!(
        username(&status),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    assert_eq!(
        extra(&status, "authentication.kubernetes.io/pod-name"),
        Some(["app-0".to_owned()].as_slice())
    );
    assert_eq!(
        extra(&status, "authentication.kubernetes.io/pod-uid"),
        Some([uid].as_slice())
    );
    // The pod's node is reported too (ServiceAccountTokenPodNodeInfo, on by default
    // since 1.30), which ztunnel node authorization can compare with.
    assert_eq!(
        extra(&status, "authentication.kubernetes.io/node-name"),
        Some([NODE.to_owned()].as_slice())
    );
}

#[tokio::test]
async fn a_token_bound_to_a_pod_that_was_deleted_is_unauthenticated() {
    let h = harness!();
    let ns = h.create_namespace("deleted").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();
    let pod = h.create_pod(&ns, "app-0", "workload", NODE).await.unwrap();
    let token = h
        .request_token(
            &ns,
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).bound_to(&pod),
        )
        .await
        .unwrap();

    h.delete_pod(&ns, "app-0").await.unwrap();

    // Never reviewed while the pod existed, so no cached success applies; the
    // validator's pod lookup may lag the delete by an informer update.
    let admin = h.admin_client();
    let status = eventually(Duration::from_secs(5), || async {
        let status = review_token(&admin, &token, &[CA_AUDIENCE]).await?;
        anyhow::ensure!(!authenticated(&status), "still authenticated: {status:?}");
        Ok(status)
    })
    .await
    .unwrap();
    assert_rejected_because(&status, "service account token has been invalidated");
}

#[tokio::test]
async fn a_pod_bound_token_stops_authenticating_within_the_apiserver_cache_ttl_after_the_pod_is_deleted()
 {
    let h = harness!();
    let ns = h.create_namespace("cached").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();
    let pod = h.create_pod(&ns, "app-0", "workload", NODE).await.unwrap();
    let token = h
        .request_token(
            &ns,
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).bound_to(&pod),
        )
        .await
        .unwrap();
    let admin = h.admin_client();
    let before = review_token(&admin, &token, &[CA_AUDIENCE]).await.unwrap();
    assert!(authenticated(&before), "{before:?}");

    h.delete_pod(&ns, "app-0").await.unwrap();
    let deleted_at = Instant::now();

    // kube-apiserver caches successful token authentications for 10 s
    // (TokenSuccessCacheTTL), so a review right after the delete may still
    // succeed; it must not outlive the TTL.
    let status = eventually(Duration::from_secs(15), || async {
        let status = review_token(&admin, &token, &[CA_AUDIENCE]).await?;
        anyhow::ensure!(!authenticated(&status), "still authenticated: {status:?}");
        Ok(status)
    })
    .await
    .unwrap();
    assert_rejected_because(&status, "service account token has been invalidated");
    eprintln!(
        "pod-bound token rejected {:?} after the pod was deleted",
        deleted_at.elapsed()
    );
}

#[tokio::test]
async fn a_service_account_without_create_tokenreviews_is_refused_with_403_until_granted() {
    let h = harness!();
    let ns = h.create_namespace("rbac").await.unwrap();
    h.create_service_account(&ns, "ca-server").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();
    // The CA server's own token is for the apiserver (default audience).
    let ca_token = h
        .request_token(&ns, "ca-server", &TokenOptions::default())
        .await
        .unwrap();
    let ca_client = h.client_for_token(&ca_token);
    let workload_token = h
        .request_token(&ns, "workload", &TokenOptions::for_audiences([CA_AUDIENCE]))
        .await
        .unwrap();

    let refused = review_token(&ca_client, &workload_token, &[CA_AUDIENCE])
        .await
        .unwrap_err();
    assert_eq!(api_status_code(&refused), Some(403), "{refused:?}");

    h.grant_token_review(&ns, "ca-server").await.unwrap();

    let status = eventually(Duration::from_secs(10), || async {
        Ok(review_token(&ca_client, &workload_token, &[CA_AUDIENCE]).await?)
    })
    .await
    .unwrap();
    assert!(authenticated(&status), "{status:?}");
    assert_eq!(
        username(&status),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
}

#[tokio::test]
async fn a_token_request_for_less_than_ten_minutes_is_rejected() {
    // Documents why `an_expired_token_is_unauthenticated` re-signs a token.
    let h = harness!();
    let ns = h.create_namespace("short").await.unwrap();
    h.create_service_account(&ns, "workload").await.unwrap();

    let err = h
        .request_token(
            &ns,
            "workload",
            &TokenOptions::for_audiences([CA_AUDIENCE]).expiring_in(599),
        )
        .await
        .unwrap_err();

    let api_error = err.downcast_ref::<kube::Error>().expect("an API error");
    assert_eq!(api_status_code(api_error), Some(422), "{api_error:?}");
}
