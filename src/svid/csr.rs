//! Workload key generation and the CSR the agent sends.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::identity::SpiffeId;

/// Which key the agent generates for its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKeyType {
    /// ECDSA P-256 (default; what ztunnel uses).
    #[default]
    EcdsaP256,
    /// RSA 2048 (what istio-agent uses by default).
    Rsa2048,
}

/// Generates a fresh key and a PEM CSR for `identity`: empty subject, one URI SAN (which is
/// then critical), no other extensions. Errors only if key generation or encoding fails.
pub fn generate_csr(
    identity: &SpiffeId,
    key_type: WorkloadKeyType,
) -> Result<(KeyPair, String), rcgen::Error> {
    let key = match key_type {
        WorkloadKeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        WorkloadKeyType::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?
        }
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::check_csr;

    #[test]
    fn the_agent_csr_passes_the_server_policy_for_both_key_types() {
        let id = SpiffeId::for_service_account("td", "ns", "sa").unwrap();
        for kt in [WorkloadKeyType::EcdsaP256, WorkloadKeyType::Rsa2048] {
            let (_key, pem) = generate_csr(&id, kt).unwrap();
            check_csr(&pem, &id).unwrap();
        }
    }
}
