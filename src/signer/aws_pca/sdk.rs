//! [`PcaApi`] over the AWS SDK (`aws-sdk-acmpca`), with credentials from the standard chain
//! (environment, profile, web identity / IRSA, EKS Pod Identity, IMDS).

use std::time::Duration;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_acmpca::Client;
use aws_sdk_acmpca::config::retry::RetryConfig;
use aws_sdk_acmpca::config::timeout::TimeoutConfig;
use aws_sdk_acmpca::config::{BehaviorVersion, Region};
use aws_sdk_acmpca::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types as t;

use super::api::{
    ApiError, CaDescription, CertificateAndChain, ExtendedKeyUsage, IssueRequest, PcaApi,
    ValidityKind,
};
use futures::future::BoxFuture;

/// How long one request may take, including connecting.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The AWS SDK client. The SDK's own retries are disabled: the caller retries (with a rate
/// limit and metrics), so one [`PcaApi`] call is exactly one HTTP request.
#[derive(Clone, Debug)]
pub struct SdkPcaClient {
    client: Client,
}

impl SdkPcaClient {
    /// Loads credentials from the default chain for `region`; `endpoint` overrides the
    /// service URL (e.g. `http://127.0.0.1:5000` for moto). Credentials are resolved lazily,
    /// so a missing one surfaces as [`ApiError::Credentials`] on the first call.
    pub async fn new(region: &str, endpoint: Option<&str>) -> Self {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .load()
            .await;
        let mut conf = aws_sdk_acmpca::config::Builder::from(&shared);
        if let Some(url) = endpoint {
            conf = conf.endpoint_url(url);
        }
        Self {
            client: Client::from_conf(conf.build()),
        }
    }
}

/// Classifies an SDK error by its type: a service error by its code
/// ([`ProvideErrorMetadata::code`]), a failure to load credentials by the
/// [`CredentialsError`] in its source chain, the rest as transient.
fn classify<E>(err: SdkError<E, aws_sdk_acmpca::config::http::HttpResponse>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => ApiError::from_code(
            ctx.err().code().unwrap_or_default(),
            ctx.err().message().unwrap_or_default(),
            ctx.raw().status().as_u16(),
        ),
        SdkError::TimeoutError(_) => ApiError::Transient("request timed out".into()),
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => {
            let text = DisplayErrorContext(&err).to_string();
            if credentials_failed(&err) {
                ApiError::Credentials(text)
            } else {
                ApiError::Transient(text)
            }
        }
        SdkError::ResponseError(ctx) => ApiError::Transient(format!(
            "unusable response (HTTP {})",
            ctx.raw().status().as_u16()
        )),
        _ => ApiError::Transient(DisplayErrorContext(&err).to_string()),
    }
}

/// Whether `err` was caused by the credentials provider (none found, or it failed), rather
/// than by the connection.
fn credentials_failed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if e.is::<CredentialsError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

fn missing(what: &str) -> ApiError {
    ApiError::Other {
        code: "IncompleteResponse".into(),
        message: format!("response has no {what}"),
    }
}

fn cert_and_chain(
    certificate: Option<&str>,
    chain: Option<&str>,
) -> Result<CertificateAndChain, ApiError> {
    Ok(CertificateAndChain {
        certificate: certificate
            .ok_or_else(|| missing("Certificate"))?
            .to_owned(),
        chain: chain.filter(|c| !c.trim().is_empty()).map(str::to_owned),
    })
}

fn to_sdk_request(req: &IssueRequest) -> Result<Option<t::ApiPassthrough>, ApiError> {
    let Some(pt) = &req.api_passthrough else {
        return Ok(None);
    };
    let key_usage = t::KeyUsage::builder()
        .digital_signature(pt.key_usage.digital_signature)
        .key_encipherment(pt.key_usage.key_encipherment)
        .build();
    let ekus = pt
        .extended_key_usage
        .iter()
        .map(|e| {
            let kind = match e {
                ExtendedKeyUsage::ServerAuth => t::ExtendedKeyUsageType::ServerAuth,
                ExtendedKeyUsage::ClientAuth => t::ExtendedKeyUsageType::ClientAuth,
            };
            t::ExtendedKeyUsage::builder()
                .extended_key_usage_type(kind)
                .build()
        })
        .collect::<Vec<_>>();
    let customs = pt
        .custom_extensions
        .iter()
        .map(|c| {
            t::CustomExtension::builder()
                .object_identifier(&c.object_identifier)
                .value(&c.value_base64)
                .critical(c.critical)
                .build()
                .map_err(|e| ApiError::InvalidArgs(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut extensions = t::Extensions::builder().key_usage(key_usage);
    if !ekus.is_empty() {
        extensions = extensions.set_extended_key_usage(Some(ekus));
    }
    if !customs.is_empty() {
        extensions = extensions.set_custom_extensions(Some(customs));
    }
    let mut subject = t::Asn1Subject::builder().organization(&pt.subject.organization);
    if let Some(cn) = &pt.subject.common_name {
        subject = subject.common_name(cn);
    }
    Ok(Some(
        t::ApiPassthrough::builder()
            .extensions(extensions.build())
            .subject(subject.build())
            .build(),
    ))
}

impl PcaApi for SdkPcaClient {
    fn describe_certificate_authority<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CaDescription, ApiError>> {
        Box::pin(async move {
            let out = self
                .client
                .describe_certificate_authority()
                .certificate_authority_arn(ca_arn)
                .send()
                .await
                .map_err(classify)?;
            let ca = out
                .certificate_authority()
                .ok_or_else(|| missing("CertificateAuthority"))?;
            let conf = ca
                .certificate_authority_configuration()
                .ok_or_else(|| missing("CertificateAuthorityConfiguration"))?;
            Ok(CaDescription {
                status: ca
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                key_algorithm: conf.key_algorithm().as_str().to_owned(),
                usage_mode: ca.usage_mode().map(|m| m.as_str().to_owned()),
                ca_type: ca.r#type().map(|m| m.as_str().to_owned()),
            })
        })
    }

    fn get_certificate_authority_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        Box::pin(async move {
            let out = self
                .client
                .get_certificate_authority_certificate()
                .certificate_authority_arn(ca_arn)
                .send()
                .await
                .map_err(classify)?;
            cert_and_chain(out.certificate(), out.certificate_chain())
        })
    }

    fn issue_certificate<'a>(
        &'a self,
        req: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        Box::pin(async move {
            let kind = match req.validity.kind {
                ValidityKind::Days => t::ValidityPeriodType::Days,
                ValidityKind::Absolute => t::ValidityPeriodType::Absolute,
            };
            let validity = t::Validity::builder()
                .value(req.validity.value)
                .r#type(kind)
                .build()
                .map_err(|e| ApiError::InvalidArgs(e.to_string()))?;
            let out = self
                .client
                .issue_certificate()
                .certificate_authority_arn(&req.ca_arn)
                .csr(Blob::new(req.csr_pem.clone()))
                .template_arn(req.template_arn)
                .signing_algorithm(t::SigningAlgorithm::from(req.signing_algorithm))
                .validity(validity)
                .idempotency_token(&req.idempotency_token)
                .set_api_passthrough(to_sdk_request(req)?)
                .send()
                .await
                .map_err(classify)?;
            out.certificate_arn()
                .map(str::to_owned)
                .ok_or_else(|| missing("CertificateArn"))
        })
    }

    fn get_certificate<'a>(
        &'a self,
        ca_arn: &'a str,
        certificate_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        Box::pin(async move {
            let out = self
                .client
                .get_certificate()
                .certificate_authority_arn(ca_arn)
                .certificate_arn(certificate_arn)
                .send()
                .await
                .map_err(classify)?;
            cert_and_chain(out.certificate(), out.certificate_chain())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_acmpca::config::{Credentials, SharedCredentialsProvider};
    use aws_sdk_acmpca::error::ConnectorError;

    /// A credentials provider that finds nothing, like the default chain on a machine without
    /// credentials.
    #[derive(Debug)]
    struct NoCredentials;

    impl aws_sdk_acmpca::config::ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                CredentialsError::not_loaded("no providers in chain provided credentials"),
            ))
        }
    }

    /// A client for a closed loopback port with `credentials`.
    async fn client_to_closed_port(credentials: SharedCredentialsProvider) -> SdkPcaClient {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let conf = aws_sdk_acmpca::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-1"))
            .credentials_provider(credentials)
            .retry_config(RetryConfig::disabled())
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .build();
        SdkPcaClient {
            client: Client::from_conf(conf),
        }
    }

    const ARN: &str = "arn:aws:acm-pca:eu-west-1:123456789012:certificate-authority/x";

    #[tokio::test]
    async fn missing_credentials_are_classified_by_the_sdk_error_type() {
        let client = client_to_closed_port(SharedCredentialsProvider::new(NoCredentials)).await;
        let err = client
            .describe_certificate_authority(ARN)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Credentials(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_with_credentials_is_transient() {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let client = client_to_closed_port(SharedCredentialsProvider::new(creds)).await;
        let err = client
            .describe_certificate_authority(ARN)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Transient(_)), "{err:?}");
    }

    #[test]
    fn a_message_mentioning_credentials_is_not_a_credentials_error() {
        let io = std::io::Error::other("credential endpoint unreachable");
        let dispatch: SdkError<aws_sdk_acmpca::Error, aws_sdk_acmpca::config::http::HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(io.into()));
        assert!(matches!(classify(dispatch), ApiError::Transient(_)));
        let dispatch: SdkError<aws_sdk_acmpca::Error, aws_sdk_acmpca::config::http::HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::other(
                Box::new(CredentialsError::not_loaded_no_source()),
                None,
            ));
        assert!(matches!(classify(dispatch), ApiError::Credentials(_)));
    }
}
