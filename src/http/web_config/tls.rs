//! `tls_server_config`: the checks of its keys and the rustls server config it builds
//! (versions, cipher suites, client certificates).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_saphyr::Spanned;

use super::WebConfigError;
use super::file::{Files, Invalid, RawTls, Text, resolve};

/// How clients authenticate with certificates.
enum ClientAuth<'r> {
    None,
    /// Verified against `client_ca_file`; `optional` for `VerifyClientCertIfGiven`.
    Verify {
        ca: &'r Text,
        optional: bool,
    },
}

/// Checks `tls_server_config` and, with `files`, builds the rustls config from them.
pub(super) fn tls_config(
    path: &Path,
    tls: &Spanned<RawTls>,
    files: Option<&Files>,
    invalid: &Invalid<'_>,
) -> Result<Option<rustls::ServerConfig>, WebConfigError> {
    let section = tls.referenced;
    let tls = &tls.value;
    let _ = tls.prefer_server_cipher_suites;
    let named = |key: &str, file: &'_ Option<Text>| -> Result<(), WebConfigError> {
        match file {
            Some(_) => Ok(()),
            None => Err(invalid(
                key,
                section,
                "required when tls_server_config is set".to_owned(),
            )),
        }
    };
    named("tls_server_config.cert_file", &tls.cert_file)?;
    named("tls_server_config.key_file", &tls.key_file)?;

    let version =
        |key: &str, value: &Option<Text>, default: &'static rustls::SupportedProtocolVersion| {
            match value
                .as_ref()
                .map(|value| (value.value.as_str(), value.referenced))
            {
                None => Ok(default),
                Some(("TLS12", _)) => Ok(&rustls::version::TLS12),
                Some(("TLS13", _)) => Ok(&rustls::version::TLS13),
                Some((other, at)) => Err(invalid(
                    key,
                    at,
                    format!("unsupported version {other:?}; rustls supports TLS12 and TLS13"),
                )),
            }
        };
    let min = version(
        "tls_server_config.min_version",
        &tls.min_version,
        &rustls::version::TLS12,
    )?;
    let max = version(
        "tls_server_config.max_version",
        &tls.max_version,
        &rustls::version::TLS13,
    )?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13]
            .into_iter()
            .filter(|v| {
                !(min.version == rustls::ProtocolVersion::TLSv1_3
                    && v.version == rustls::ProtocolVersion::TLSv1_2)
            })
            .filter(|v| {
                !(max.version == rustls::ProtocolVersion::TLSv1_2
                    && v.version == rustls::ProtocolVersion::TLSv1_3)
            })
            .collect();
    if versions.is_empty() {
        let at = tls
            .min_version
            .as_ref()
            .map_or(section, |min| min.referenced);
        return Err(invalid(
            "tls_server_config.min_version",
            at,
            "is above max_version".to_owned(),
        ));
    }

    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = &tls.cipher_suites {
        let mut chosen = Vec::new();
        for name in names {
            let wanted = name.value.trim_end_matches("_SHA256");
            let Some(suite) = rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|suite| {
                    suite.version().version == rustls::ProtocolVersion::TLSv1_2
                        && format!("{:?}", suite.suite()).trim_end_matches("_SHA256") == wanted
                })
            else {
                return Err(invalid(
                    "tls_server_config.cipher_suites",
                    name.referenced,
                    format!("{:?} is not a TLS 1.2 suite rustls supports", name.value),
                ));
            };
            chosen.push(*suite);
        }
        // TLS 1.3 suites are not configurable (as in Go); they are always offered.
        provider.cipher_suites.retain(|suite| {
            suite.version().version == rustls::ProtocolVersion::TLSv1_3 || chosen.contains(suite)
        });
    }
    let provider = Arc::new(provider);

    let (auth, auth_at) = tls
        .client_auth_type
        .as_ref()
        .map_or(("NoClientCert", section), |auth| {
            (auth.value.as_str(), auth.referenced)
        });
    let client_auth = match auth {
        "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let Some(ca) = &tls.client_ca_file else {
                return Err(invalid(
                    "tls_server_config.client_ca_file",
                    auth_at,
                    format!("required with client_auth_type {auth}"),
                ));
            };
            ClientAuth::Verify {
                ca,
                optional: auth == "VerifyClientCertIfGiven",
            }
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                auth_at,
                format!(
                    "{auth} (a client certificate that is not verified) is not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
        other => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                auth_at,
                format!(
                    "unknown value {other:?}; expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
    };

    // Everything above is checked without the files (`check-config --no-secrets`).
    let Some(files) = files else {
        return Ok(None);
    };
    let bytes_of = |key: &str, file: &Option<Text>| -> Result<&Vec<u8>, WebConfigError> {
        let file = file.as_ref().ok_or_else(|| {
            invalid(
                key,
                section,
                "required when tls_server_config is set".to_owned(),
            )
        })?;
        files
            .referenced
            .get(&resolve(path, &file.value))
            .ok_or_else(|| invalid(key, file.referenced, "was not read".to_owned()))
    };
    let cert_at = tls
        .cert_file
        .as_ref()
        .map_or(section, |file| file.referenced);
    let key_at = tls
        .key_file
        .as_ref()
        .map_or(section, |file| file.referenced);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bytes_of("tls_server_config.cert_file", &tls.cert_file)?)
            .collect::<Result<_, _>>()
            .map_err(|error| {
                invalid(
                    "tls_server_config.cert_file",
                    cert_at,
                    format!("not a PEM certificate: {error}"),
                )
            })?;
    if certs.is_empty() {
        return Err(invalid(
            "tls_server_config.cert_file",
            cert_at,
            "no certificate in the file".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(bytes_of("tls_server_config.key_file", &tls.key_file)?)
        .map_err(|error| {
            invalid(
                "tls_server_config.key_file",
                key_at,
                format!("not a PEM private key: {error}"),
            )
        })?;

    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match client_auth {
        ClientAuth::None => rustls::server::WebPkiClientVerifier::no_client_auth(),
        ClientAuth::Verify { ca, optional } => {
            let key = "tls_server_config.client_ca_file";
            let bytes = bytes_of(key, &tls.client_ca_file)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(bytes) {
                let cert = cert.map_err(|error| {
                    invalid(
                        key,
                        ca.referenced,
                        format!("not a PEM certificate: {error}"),
                    )
                })?;
                roots.add(cert).map_err(|error| {
                    invalid(
                        key,
                        ca.referenced,
                        format!("unusable CA certificate: {error}"),
                    )
                })?;
            }
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&provider),
            );
            let builder = if optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder.build().map_err(|error| {
                invalid(
                    key,
                    ca.referenced,
                    format!("cannot verify clients: {error}"),
                )
            })?
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|error| invalid("tls_server_config", section, format!("{error}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|error| {
            invalid(
                "tls_server_config.key_file",
                key_at,
                format!("does not match the certificate: {error}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(config))
}
