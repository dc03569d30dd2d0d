//! Settings of the AWS Private CA signer (validated by [`crate::config`]).

use std::time::Duration;

/// How meshid uses the PCA CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PcaMode {
    /// Every SVID is issued by PCA (one `IssueCertificate` per workload rotation).
    Direct,
    /// PCA issues a short-lived intermediate to meshid, which signs SVIDs locally and renews
    /// the intermediate well before it expires (a handful of PCA calls a week).
    #[default]
    Intermediate,
}

impl PcaMode {
    /// `direct` or `intermediate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Intermediate => "intermediate",
        }
    }
}

/// Default client-side rate limit, requests per second (PCA's own per-account quotas are
/// higher; see docs/aws-pca.md).
pub const DEFAULT_TPS: u32 = 10;
/// Default bound on signing requests waiting for PCA in direct mode.
pub const DEFAULT_MAX_PENDING: usize = 1000;
/// Default lifetime of the intermediate (short-lived-mode CAs allow up to 7 days).
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(6 * 24 * 3600);

/// Validated settings of the AWS Private CA signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsPcaOptions {
    /// `arn:<partition>:acm-pca:<region>:<account>:certificate-authority/<id>`.
    pub ca_arn: String,
    /// The region to call (the ARN's unless overridden).
    pub region: String,
    /// Endpoint URL override (moto, VPC endpoints); `None` for the regional default.
    pub endpoint: Option<String>,
    /// Direct or intermediate.
    pub mode: PcaMode,
    /// Client-side limit on PCA requests per second (every API, retries and polls included).
    pub requests_per_second: u32,
    /// Signing requests allowed to wait for PCA at once; more are refused as unavailable.
    pub max_pending: usize,
    /// Lifetime of the intermediate (intermediate mode).
    pub intermediate_ttl: Duration,
}

/// The parts of a PCA CA ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaArn {
    /// `aws`, `aws-cn`, `aws-us-gov`.
    pub partition: String,
    /// e.g. `eu-west-1`.
    pub region: String,
    /// 12-digit account.
    pub account: String,
}

/// Parses a PCA CA ARN; the error says what is wrong with it.
pub fn parse_ca_arn(arn: &str) -> Result<CaArn, String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts.as_slice() else {
        return Err(format!("{arn:?} is not an ARN"));
    };
    if *prefix != "arn" || partition.is_empty() {
        return Err(format!("{arn:?} is not an ARN"));
    }
    if *service != "acm-pca" {
        return Err(format!("{arn:?} is not an AWS Private CA (acm-pca) ARN"));
    }
    if region.is_empty() || account.is_empty() {
        return Err(format!("{arn:?} lacks a region or account"));
    }
    let Some(id) = resource.strip_prefix("certificate-authority/") else {
        return Err(format!("{arn:?} does not name a certificate-authority"));
    };
    if id.is_empty() || id.contains('/') {
        return Err(format!("{arn:?} does not name a certificate-authority"));
    }
    Ok(CaArn {
        partition: (*partition).to_owned(),
        region: (*region).to_owned(),
        account: (*account).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_arns_are_parsed_and_anything_else_is_refused_with_a_reason() {
        let a =
            parse_ca_arn("arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/1234-abcd")
                .unwrap();
        assert_eq!(a.region, "eu-west-1");
        assert_eq!(a.account, "123456789012");
        for (bad, why) in [
            ("nope", "not an ARN"),
            ("arn:aws:acm:eu-west-1:1:certificate/x", "acm-pca"),
            ("arn:aws:acm-pca::1:certificate-authority/x", "region"),
            (
                "arn:aws:acm-pca:eu-west-1:1:certificate-authority/x/certificate/y",
                "certificate-authority",
            ),
        ] {
            let err = parse_ca_arn(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
