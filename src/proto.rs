//! Generated code for our wire-compatible copy of Istio's CA API (`proto/istio/v1/auth/ca.proto`).

/// `istio.v1.auth`: the CreateCertificate service that istio-agent and ztunnel call.
#[allow(missing_docs, clippy::all)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

pub use istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
pub use istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
pub use istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
