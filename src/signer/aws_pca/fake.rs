//! A test double of [`PcaApi`]: records every request, answers from a real (rcgen) root CA,
//! honours idempotency tokens like PCA, and can be scripted to fail or to be slow.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use super::api::{
    Api, ApiError, CaDescription, CertificateAndChain, ExtendedKeyUsage, IssueRequest, PcaApi,
    ValidityKind,
};
use super::request::{INTERMEDIATE_TEMPLATE_ARN, LEAF_TEMPLATE_ARN};
use crate::identity::random_serial;
use futures::future::BoxFuture;

/// One recorded call.
#[derive(Debug, Clone)]
pub enum Call {
    /// `DescribeCertificateAuthority`.
    Describe,
    /// `GetCertificateAuthorityCertificate`.
    GetCaCertificate,
    /// `IssueCertificate` with its request.
    Issue(Box<IssueRequest>),
    /// `GetCertificate` for this certificate ARN.
    Get(String),
}

impl Call {
    fn api(&self) -> Api {
        match self {
            Self::Describe => Api::Describe,
            Self::GetCaCertificate => Api::GetCaCertificate,
            Self::Issue(_) => Api::Issue,
            Self::Get(_) => Api::Get,
        }
    }
}

/// The fake CA.
pub struct FakePca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    /// What Describe returns.
    pub description: Mutex<CaDescription>,
    calls: Mutex<Vec<(tokio::time::Instant, Call)>>,
    failures: Mutex<HashMap<Api, VecDeque<ApiError>>>,
    certificates: Mutex<HashMap<String, CertificateAndChain>>,
    tokens: Mutex<HashMap<String, String>>,
    /// How long each IssueCertificate takes.
    pub issue_delay: Mutex<Duration>,
    /// Copy the CSR's subject into leaves and ignore `ApiPassthrough.Subject` (what moto does,
    /// and what a template falling back to the CSR would do).
    pub copy_csr_subject: std::sync::atomic::AtomicBool,
    /// How far before issuance notBefore is set (PCA: one hour).
    pub backdate: Mutex<Duration>,
}

impl FakePca {
    /// An ACTIVE general-purpose EC P-256 root CA.
    pub fn new() -> Self {
        let (root_pem, key_pem) = crate::signer::local::generate_root("fake-pca").unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).unwrap();
        Self {
            issuer,
            root_pem,
            description: Mutex::new(CaDescription {
                status: "ACTIVE".into(),
                key_algorithm: "EC_prime256v1".into(),
                usage_mode: Some("GENERAL_PURPOSE".into()),
                ca_type: Some("ROOT".into()),
            }),
            calls: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            certificates: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            issue_delay: Mutex::new(Duration::ZERO),
            copy_csr_subject: Default::default(),
            backdate: Mutex::new(Duration::ZERO),
        }
    }

    /// Makes the next calls of `api` fail with `errors`, in order.
    pub fn fail(&self, api: Api, errors: impl IntoIterator<Item = ApiError>) {
        self.failures
            .lock()
            .unwrap()
            .entry(api)
            .or_default()
            .extend(errors);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// When each call of `api` arrived.
    pub fn times(&self, api: Api) -> Vec<tokio::time::Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.api() == api)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The IssueCertificate requests so far.
    pub fn issued(&self) -> Vec<IssueRequest> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Issue(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// How many calls of `api` so far.
    pub fn count(&self, api: Api) -> usize {
        self.times(api).len()
    }

    fn record(&self, call: Call) -> Result<(), ApiError> {
        let api = call.api();
        self.calls
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), call));
        match self
            .failures
            .lock()
            .unwrap()
            .get_mut(&api)
            .and_then(|q| q.pop_front())
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn sign(&self, req: &IssueRequest) -> Result<String, ApiError> {
        let bad = |m: &str| ApiError::MalformedCsr(m.to_owned());
        let der = CertificateSigningRequestDer::from_pem_slice(&req.csr_pem)
            .map_err(|_| bad("not PEM"))?;
        let (_, csr) =
            X509CertificationRequest::from_der(der.as_ref()).map_err(|_| bad("not PKCS#10"))?;
        csr.verify_signature().map_err(|_| bad("bad signature"))?;
        let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|_| bad("key"))?;
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.serial_number = Some(random_serial());
        p.not_before = now - *self.backdate.lock().unwrap();
        p.not_after = match req.validity.kind {
            ValidityKind::Days => now + Duration::from_secs(req.validity.value as u64 * 86_400),
            ValidityKind::Absolute => OffsetDateTime::from_unix_timestamp(req.validity.value)
                .map_err(|_| ApiError::InvalidArgs("validity".into()))?,
        };
        p.use_authority_key_identifier_extension = true;
        match req.template_arn {
            LEAF_TEMPLATE_ARN => {
                p.is_ca = IsCa::ExplicitNoCa;
                let pt = req.api_passthrough.clone().unwrap_or_default();
                if self
                    .copy_csr_subject
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    for attr in csr.certification_request_info.subject.iter_attributes() {
                        if let Ok(v) = attr.as_str() {
                            p.distinguished_name.push(
                                DnType::from_oid(
                                    &attr.attr_type().iter().unwrap().collect::<Vec<_>>(),
                                ),
                                v,
                            );
                        }
                    }
                } else {
                    p.distinguished_name
                        .push(DnType::OrganizationName, pt.subject.organization.as_str());
                    if let Some(cn) = &pt.subject.common_name {
                        p.distinguished_name.push(DnType::CommonName, cn.as_str());
                    }
                }
                if pt.key_usage.digital_signature {
                    p.key_usages.push(KeyUsagePurpose::DigitalSignature);
                }
                if pt.key_usage.key_encipherment {
                    p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
                }
                for e in &pt.extended_key_usage {
                    p.extended_key_usages.push(match e {
                        ExtendedKeyUsage::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsage::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
                    });
                }
                for c in &pt.custom_extensions {
                    let oid: Vec<u64> = c
                        .object_identifier
                        .split('.')
                        .map(|n| n.parse().unwrap())
                        .collect();
                    let value = base64::engine::general_purpose::STANDARD
                        .decode(&c.value_base64)
                        .map_err(|_| ApiError::InvalidArgs("custom extension".into()))?;
                    let mut ext = CustomExtension::from_oid_content(&oid, value);
                    ext.set_criticality(c.critical);
                    p.custom_extensions.push(ext);
                }
            }
            INTERMEDIATE_TEMPLATE_ARN => {
                p.distinguished_name
                    .push(DnType::CommonName, "fake intermediate");
                p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                p.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
            }
            other => return Err(ApiError::InvalidArgs(format!("template {other}"))),
        }
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(|e| ApiError::InvalidArgs(e.to_string()))?;
        let arn = format!(
            "{}/certificate/{}",
            req.ca_arn,
            hex::encode(rand::random::<[u8; 8]>())
        );
        self.certificates.lock().unwrap().insert(
            arn.clone(),
            CertificateAndChain {
                // Like PCA and moto: no trailing newlines.
                certificate: cert.pem().trim().to_owned(),
                chain: Some(self.root_pem.trim().to_owned()),
            },
        );
        Ok(arn)
    }
}

impl PcaApi for FakePca {
    fn describe_certificate_authority<'a>(
        &'a self,
        _ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CaDescription, ApiError>> {
        Box::pin(async move {
            self.record(Call::Describe)?;
            Ok(self.description.lock().unwrap().clone())
        })
    }

    fn get_certificate_authority_certificate<'a>(
        &'a self,
        _ca_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        Box::pin(async move {
            self.record(Call::GetCaCertificate)?;
            Ok(CertificateAndChain {
                certificate: self.root_pem.trim().to_owned(),
                chain: None,
            })
        })
    }

    fn issue_certificate<'a>(
        &'a self,
        req: &'a IssueRequest,
    ) -> BoxFuture<'a, Result<String, ApiError>> {
        Box::pin(async move {
            self.record(Call::Issue(Box::new(req.clone())))?;
            let delay = *self.issue_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(arn) = self.tokens.lock().unwrap().get(&req.idempotency_token) {
                return Ok(arn.clone());
            }
            let arn = self.sign(req)?;
            self.tokens
                .lock()
                .unwrap()
                .insert(req.idempotency_token.clone(), arn.clone());
            Ok(arn)
        })
    }

    fn get_certificate<'a>(
        &'a self,
        _ca_arn: &'a str,
        certificate_arn: &'a str,
    ) -> BoxFuture<'a, Result<CertificateAndChain, ApiError>> {
        Box::pin(async move {
            self.record(Call::Get(certificate_arn.to_owned()))?;
            self.certificates
                .lock()
                .unwrap()
                .get(certificate_arn)
                .cloned()
                .ok_or_else(|| ApiError::NotFound(certificate_arn.to_owned()))
        })
    }
}
