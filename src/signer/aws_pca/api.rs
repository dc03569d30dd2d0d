//! The four AWS Private CA calls meshid makes, as a trait with plain request/response types.
//!
//! [`PcaApi`] is implemented over the AWS SDK by [`super::SdkPcaClient`] and by test doubles;
//! everything above it (rate limiting, retries, coalescing, certificate handling) is written
//! against this trait only.

use futures::future::BoxFuture;

/// One of the PCA operations, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `DescribeCertificateAuthority`.
    Describe,
    /// `GetCertificateAuthorityCertificate`.
    GetCaCertificate,
    /// `IssueCertificate`.
    Issue,
    /// `GetCertificate`.
    Get,
}

impl Api {
    /// The operation name as AWS spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Describe => "DescribeCertificateAuthority",
            Self::GetCaCertificate => "GetCertificateAuthorityCertificate",
            Self::Issue => "IssueCertificate",
            Self::Get => "GetCertificate",
        }
    }
}

/// What `DescribeCertificateAuthority` told us about the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaDescription {
    /// `ACTIVE`, `PENDING_CERTIFICATE`, `DISABLED`, ...
    pub status: String,
    /// `EC_prime256v1`, `RSA_2048`, ...
    pub key_algorithm: String,
    /// `GENERAL_PURPOSE` or `SHORT_LIVED_CERTIFICATE` (absent in old responses).
    pub usage_mode: Option<String>,
    /// `ROOT` or `SUBORDINATE`.
    pub ca_type: Option<String>,
}

/// A certificate (PEM) and the chain above it (PEM, possibly several blocks), as PCA returns
/// them. PEMs may lack trailing newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateAndChain {
    /// The certificate.
    pub certificate: String,
    /// Its issuers, issuer first; absent for a root.
    pub chain: Option<String>,
}

/// How `Validity.Value` is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidityKind {
    /// Whole days after issuance.
    Days,
    /// Seconds since the Unix epoch.
    Absolute,
}

/// `IssueCertificate.Validity`: the certificate's "not after".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Unit of `value`.
    pub kind: ValidityKind,
    /// Days, or a Unix time.
    pub value: i64,
}

/// An `ExtendedKeyUsage` value PCA knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtendedKeyUsage {
    /// `SERVER_AUTH` (1.3.6.1.5.5.7.3.1).
    ServerAuth,
    /// `CLIENT_AUTH` (1.3.6.1.5.5.7.3.2).
    ClientAuth,
}

/// `Extensions.KeyUsage` bits we set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyUsage {
    /// digitalSignature.
    pub digital_signature: bool,
    /// keyEncipherment.
    pub key_encipherment: bool,
}

/// `Extensions.CustomExtensions[]`: an arbitrary extension, value base64 DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomExtension {
    /// Dotted OID.
    pub object_identifier: String,
    /// Base64 of the DER extension value (the content of the extnValue OCTET STRING).
    pub value_base64: String,
    /// Whether the extension is critical.
    pub critical: bool,
}

/// `ApiPassthrough.Subject`: the subject meshid decides. Always sent, because the
/// `APIPassthrough` template copies the CSR's subject whenever the API gives none, and an
/// empty `ASN1Subject` cannot be expressed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subject {
    /// `Organization` (at most 64 characters).
    pub organization: String,
    /// `CommonName` (at most 64 characters), if any.
    pub common_name: Option<String>,
}

/// `IssueCertificate.ApiPassthrough`: the certificate content we decide (used with an
/// `APIPassthrough` template, so only the key is taken from the CSR).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiPassthrough {
    /// `Subject`.
    pub subject: Subject,
    /// `Extensions.KeyUsage`.
    pub key_usage: KeyUsage,
    /// `Extensions.ExtendedKeyUsage`.
    pub extended_key_usage: Vec<ExtendedKeyUsage>,
    /// `Extensions.CustomExtensions` (our subjectAltName, so that it can be critical).
    pub custom_extensions: Vec<CustomExtension>,
}

/// An `IssueCertificate` request.
#[derive(Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// The CA.
    pub ca_arn: String,
    /// PEM CSR bytes.
    pub csr_pem: Vec<u8>,
    /// Template ARN.
    pub template_arn: &'static str,
    /// `SHA256WITHECDSA`, `SHA256WITHRSA`, ...
    pub signing_algorithm: &'static str,
    /// Expiry.
    pub validity: Validity,
    /// At most 36 characters; equal tokens within five minutes yield one certificate.
    pub idempotency_token: String,
    /// Certificate content, for `APIPassthrough` templates.
    pub api_passthrough: Option<ApiPassthrough>,
}

impl std::fmt::Debug for IssueRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssueRequest")
            .field("ca_arn", &self.ca_arn)
            .field("csr_bytes", &self.csr_pem.len())
            .field("template_arn", &self.template_arn)
            .field("signing_algorithm", &self.signing_algorithm)
            .field("validity", &self.validity)
            .field("idempotency_token", &self.idempotency_token)
            .field("api_passthrough", &self.api_passthrough)
            .finish()
    }
}

/// A PCA call failed. Classified from the AWS error code so callers can decide to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// `ThrottlingException`, `TooManyRequestsException` and friends: retry later.
    #[error("throttled ({code})")]
    Throttled {
        /// The AWS error code.
        code: String,
    },
    /// `RequestInProgressException`: the certificate is not issued yet.
    #[error("request in progress")]
    InProgress,
    /// `ResourceNotFoundException`: no such CA or certificate (wrong ARN, account or region).
    #[error("not found (wrong ARN, account or region?): {0}")]
    NotFound(String),
    /// `InvalidArnException`.
    #[error("invalid ARN: {0}")]
    InvalidArn(String),
    /// The credentials were refused or lack permission (`AccessDeniedException`,
    /// `UnrecognizedClientException`, expired tokens, bad signatures).
    #[error("access denied ({code}; check credentials and the IAM policy): {message}")]
    AccessDenied {
        /// The AWS error code.
        code: String,
        /// AWS's message.
        message: String,
    },
    /// No credentials could be loaded from the default chain.
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    /// `InvalidStateException`: the CA is not ACTIVE.
    #[error("CA in the wrong state: {0}")]
    InvalidState(String),
    /// `MalformedCSRException`.
    #[error("CSR refused: {0}")]
    MalformedCsr(String),
    /// `InvalidArgsException`, `ValidationException`, `InvalidRequestException`.
    #[error("invalid request: {0}")]
    InvalidArgs(String),
    /// `RequestFailedException`: PCA failed to issue the certificate.
    #[error("issuance failed: {0}")]
    IssuanceFailed(String),
    /// `LimitExceededException`: a PCA quota (not a rate) is exhausted.
    #[error("quota exceeded: {0}")]
    LimitExceeded(String),
    /// Timeouts, connection errors, 5xx and unparseable responses: retry later.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Anything else.
    #[error("{code}: {message}")]
    Other {
        /// The AWS error code, or `unknown`.
        code: String,
        /// AWS's message.
        message: String,
    },
}

impl ApiError {
    /// Whether the same call may succeed if repeated after a pause.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient(_))
    }

    /// A short, stable label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::InProgress => "in_progress",
            Self::NotFound(_) => "not_found",
            Self::InvalidArn(_) => "invalid_arn",
            Self::AccessDenied { .. } => "access_denied",
            Self::Credentials(_) => "no_credentials",
            Self::InvalidState(_) => "invalid_state",
            Self::MalformedCsr(_) => "malformed_csr",
            Self::InvalidArgs(_) => "invalid_args",
            Self::IssuanceFailed(_) => "issuance_failed",
            Self::LimitExceeded(_) => "limit_exceeded",
            Self::Transient(_) => "transient",
            Self::Other { .. } => "error",
        }
    }

    /// Classifies an AWS error code (and HTTP status) into a variant.
    pub fn from_code(code: &str, message: &str, http_status: u16) -> Self {
        let message = message.to_owned();
        match code {
            "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "SlowDown"
            | "ProvisionedThroughputExceededException" => Self::Throttled {
                code: code.to_owned(),
            },
            "RequestInProgressException" => Self::InProgress,
            "ResourceNotFoundException" => Self::NotFound(message),
            "InvalidArnException" => Self::InvalidArn(message),
            "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "MissingAuthenticationToken"
            | "IncompleteSignature" => Self::AccessDenied {
                code: code.to_owned(),
                message,
            },
            "InvalidStateException" => Self::InvalidState(message),
            "MalformedCSRException" | "MalformedCsrException" => Self::MalformedCsr(message),
            "InvalidArgsException"
            | "ValidationException"
            | "InvalidRequestException"
            | "InvalidParameterException" => Self::InvalidArgs(message),
            "RequestFailedException" => Self::IssuanceFailed(message),
            "LimitExceededException" => Self::LimitExceeded(message),
            "InternalFailure" | "ServiceUnavailable" | "ServiceUnavailableException" => {
                Self::Transient(format!("{code}: {message}"))
            }
            _ if http_status == 429 => Self::Throttled {
                code: if code.is_empty() { "429" } else { code }.to_owned(),
            },
            _ if http_status >= 500 => Self::Transient(format!("HTTP {http_status} {code}")),
            _ => Self::Other {
                code: if code.is_empty() { "unknown" } else { code }.to_owned(),
                message,
            },
        }
    }
}

/// The AWS Private CA operations meshid uses, and nothing else. Implementations make exactly
/// one request per call: no retries (the caller retries, rate-limits and counts).
pub trait PcaApi: Send + Sync {
    /// `DescribeCertificateAuthority`.
    fn describe_certificate_authority<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CaDescription, ApiError>>;

    /// `GetCertificateAuthorityCertificate`: the CA's certificate and the chain above it.
    fn get_certificate_authority_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>>;

    /// `IssueCertificate`: returns the new certificate's ARN.
    fn issue_certificate<'a>(
        &'a self,
        req: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<String, ApiError>>;

    /// `GetCertificate`: [`ApiError::InProgress`] until the certificate is issued.
    fn get_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
        certificate_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_error_codes_are_classified_for_retry_decisions() {
        let cases = [
            ("ThrottlingException", 400, "throttled", true),
            ("TooManyRequestsException", 400, "throttled", true),
            ("", 429, "throttled", true),
            ("", 503, "transient", true),
            ("RequestInProgressException", 400, "in_progress", false),
            ("ResourceNotFoundException", 400, "not_found", false),
            ("AccessDeniedException", 400, "access_denied", false),
            ("UnrecognizedClientException", 400, "access_denied", false),
            ("InvalidStateException", 400, "invalid_state", false),
            ("MalformedCSRException", 400, "malformed_csr", false),
            ("SomethingNew", 400, "error", false),
        ];
        for (code, status, outcome, retry) in cases {
            let e = ApiError::from_code(code, "m", status);
            assert_eq!(e.outcome(), outcome, "{code}");
            assert_eq!(e.is_retryable(), retry, "{code}");
        }
    }
}
