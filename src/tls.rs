//! TLS for the gateway's listener: rustls (ring), TLS 1.2 and 1.3 only,
//! ALPN h2 and http/1.1, certificates from PEM files, each chosen by the
//! name the client asks for (SNI). `listener` serves with what this builds;
//! `app::watch` builds it again when a certificate or key file changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, InconsistentKeys, ServerConfig, SupportedProtocolVersion};

use crate::config::TlsConfig;

/// The versions the listener speaks; older clients get a handshake alert.
pub const VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a set of certificates cannot be served. Each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls: no certificate configured")]
    NoneConfigured,
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no certificate found (expected a PEM `BEGIN CERTIFICATE` block)", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: no private key found (expected a PEM `PRIVATE KEY` block)", .0.display())]
    NoKey(PathBuf),
    #[error("{}: not a usable certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a usable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: this key does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS settings: {0}")]
    Settings(rustls::Error),
}

/// Startup and reload report configuration problems as text.
impl From<TlsError> for String {
    fn from(error: TlsError) -> String {
        error.to_string()
    }
}

/// The rustls server settings for `certificates`: the first one is the
/// default, served to clients that ask for no name or an unknown one.
pub fn server_config(certificates: &[TlsConfig]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ByName::load(certificates, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Settings)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Certificates by the DNS names of their SubjectAltName.
#[derive(Debug)]
struct ByName {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ByName {
    fn load(certificates: &[TlsConfig], provider: &CryptoProvider) -> Result<ByName, TlsError> {
        let mut loaded = Vec::with_capacity(certificates.len());
        for tls in certificates {
            let key = certified_key(tls, provider)?;
            let names = dns_names(&key, &tls.cert)?;
            loaded.push((tls, key, names));
        }
        let default = match loaded.first() {
            Some((_, key, _)) => key.clone(),
            None => return Err(TlsError::NoneConfigured),
        };
        let mut by_name = ByName {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
        };
        for (i, (tls, key, names)) in loaded.into_iter().enumerate() {
            let cert = tls.cert.display();
            match (i, names.is_empty()) {
                (0, true) => tracing::info!("TLS certificate {cert} serves any name"),
                (0, false) => tracing::info!(
                    "TLS certificate {cert} serves {}, and any other name",
                    names.join(", ")
                ),
                (_, false) => tracing::info!("TLS certificate {cert} serves {}", names.join(", ")),
                (_, true) => tracing::warn!(
                    "TLS certificate {cert} names no DNS name (subjectAltName): \
                     only the first certificate listed serves unknown names, so no client gets it"
                ),
            }
            for name in names {
                let (map, key_name) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut by_name.wildcard, parent.to_owned()),
                    None => (&mut by_name.exact, name.clone()),
                };
                if map.contains_key(&key_name) {
                    // The first certificate listed for a name keeps it.
                    tracing::warn!("TLS certificate {cert}: {name} is served by an earlier one");
                    continue;
                }
                map.insert(key_name, key.clone());
            }
        }
        Ok(by_name)
    }

    /// Exact name, then a wildcard one label up, then the default.
    fn choose(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(client_hello.server_name()).clone())
    }
}

/// Whether `tls` can be served: both files read, a certificate and a key
/// that belong together, a leaf whose names can be read. What `serve` would
/// trip over at start, for the config's validation to report first.
pub fn check(tls: &TlsConfig) -> Result<(), TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = certified_key(tls, &provider)?;
    dns_names(&key, &tls.cert).map(|_| ())
}

/// Which certificate authorities a client trusts.
#[derive(Clone, Copy)]
pub enum Roots<'p> {
    /// The system's (rustls-native-certs).
    System,
    /// Only those of this PEM file.
    Only(&'p Path),
    /// The system's and those of this PEM file.
    SystemAnd(&'p Path),
}

/// The certificates of a `ca_file`: at least one, or why not.
pub fn ca_certificates(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let certs = read_pem(path, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })
    .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected a PEM `BEGIN CERTIFICATE` block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// rustls client settings (TLS 1.2 and 1.3, ring): `roots` to trust, a
/// client certificate to present when asked, and the ALPN protocols.
pub fn client_config(
    roots: Roots<'_>,
    client_auth: Option<&TlsConfig>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let mut store = rustls::RootCertStore::empty();
    if matches!(roots, Roots::System | Roots::SystemAnd(_)) {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = store.add(cert);
        }
    }
    if let Roots::Only(path) | Roots::SystemAnd(path) = roots {
        for cert in ca_certificates(path)? {
            store
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if store.is_empty() {
        tracing::warn!("no system CA certificates found: https to other servers needs a ca_file");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(store);
    let mut config = match client_auth {
        Some(tls) => {
            // Checked to belong together first, for a message naming both files.
            certified_key(tls, &provider).map_err(|e| e.to_string())?;
            let chain = read_pem(&tls.cert, |r| {
                rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| e.to_string())?;
            let key = read_pem(&tls.key, rustls_pemfile::private_key)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| TlsError::NoKey(tls.key.clone()).to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", tls.key.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The chain of `tls.cert` with the key of `tls.key`, checked to belong
/// together.
fn certified_key(
    tls: &TlsConfig,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = read_pem(&tls.cert, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(tls.cert.clone()));
    }
    let key: PrivateKeyDer<'static> = read_pem(&tls.key, rustls_pemfile::private_key)?
        .ok_or_else(|| TlsError::NoKey(tls.key.clone()))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: tls.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        // A key type whose public half rustls cannot derive: nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        }),
        Err(error) => Err(TlsError::BadCertificate {
            path: tls.cert.clone(),
            reason: error.to_string(),
        }),
    }
}

/// The DNS names (`*.` wildcards included) the leaf certificate is valid for,
/// lowercased.
fn dns_names(key: &CertifiedKey, path: &Path) -> Result<Vec<String>, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let leaf = key.end_entity_cert().map_err(|e| bad(e.to_string()))?;
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| bad(e.to_string()))?;
    Ok(leaf
        .valid_dns_names()
        .map(|name| name.to_ascii_lowercase())
        .collect())
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&mut dyn std::io::BufRead) -> std::io::Result<T>,
) -> Result<T, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    parse(&mut std::io::BufReader::new(file)).map_err(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedKey as Issued, IsCa, KeyPair};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Ca {
        fn new() -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        fn issue(&self, names: &[&str]) -> Issued {
            let key = KeyPair::generate().unwrap();
            let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            let params = CertificateParams::new(names).unwrap();
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            Issued {
                cert,
                key_pair: key,
            }
        }
    }

    /// `issued` written as `{stem}.pem` and `{stem}.key` in `dir`.
    fn write(dir: &Path, stem: &str, issued: &Issued) -> TlsConfig {
        let tls = TlsConfig {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&tls.cert, issued.cert.pem()).unwrap();
        std::fs::write(&tls.key, issued.key_pair.serialize_pem()).unwrap();
        tls
    }

    fn leaf(key: &CertifiedKey) -> &[u8] {
        key.end_entity_cert().unwrap().as_ref()
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn chooses_exact_name_then_one_label_wildcard_then_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let a = ca.issue(&["a.test", "www.a.test"]);
        let b = ca.issue(&["B.test"]);
        let wild = ca.issue(&["*.wild.test"]);
        let certificates = [
            write(dir.path(), "a", &a),
            write(dir.path(), "b", &b),
            write(dir.path(), "wild", &wild),
        ];
        let by_name = ByName::load(&certificates, &provider()).unwrap();
        let chosen = |name: Option<&str>| leaf(by_name.choose(name)).to_vec();
        let (a, b, wild) = (
            a.cert.der().to_vec(),
            b.cert.der().to_vec(),
            wild.cert.der().to_vec(),
        );
        assert_eq!(chosen(Some("a.test")), a);
        assert_eq!(chosen(Some("www.a.test")), a);
        assert_eq!(chosen(Some("b.test")), b);
        assert_eq!(chosen(Some("B.TEST.")), b);
        assert_eq!(chosen(Some("x.wild.test")), wild);
        // A wildcard covers exactly one label.
        assert_eq!(chosen(Some("y.x.wild.test")), a);
        assert_eq!(chosen(Some("wild.test")), a);
        assert_eq!(chosen(Some("c.test")), a);
        assert_eq!(chosen(None), a);
    }

    #[test]
    fn an_exact_name_wins_over_a_wildcard_and_the_first_listed_wins_a_tie() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let wild = ca.issue(&["*.example.test"]);
        let app = ca.issue(&["app.example.test"]);
        let again = ca.issue(&["app.example.test"]);
        let certificates = [
            write(dir.path(), "wild", &wild),
            write(dir.path(), "app", &app),
            write(dir.path(), "again", &again),
        ];
        let by_name = ByName::load(&certificates, &provider()).unwrap();
        assert_eq!(
            leaf(by_name.choose(Some("app.example.test"))),
            app.cert.der().as_ref()
        );
        assert_eq!(
            leaf(by_name.choose(Some("db.example.test"))),
            wild.cert.der().as_ref()
        );
    }

    #[test]
    fn errors_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let good = write(dir.path(), "good", &ca.issue(&["a.test"]));
        let other = write(dir.path(), "other", &ca.issue(&["b.test"]));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").unwrap();
        let missing = dir.path().join("missing.pem");

        let error = server_config(&[]).unwrap_err();
        assert!(matches!(error, TlsError::NoneConfigured), "{error}");

        let error = server_config(&[TlsConfig {
            cert: missing.clone(),
            key: good.key.clone(),
        }])
        .unwrap_err();
        assert!(
            matches!(&error, TlsError::Read { path, .. } if *path == missing),
            "{error}"
        );
        assert!(error.to_string().contains("missing.pem"), "{error}");

        let error = server_config(&[TlsConfig {
            cert: garbage.clone(),
            key: good.key.clone(),
        }])
        .unwrap_err();
        assert!(
            matches!(&error, TlsError::NoCertificate(path) if *path == garbage),
            "{error}"
        );
        assert!(error.to_string().contains("garbage.pem"), "{error}");

        // A key file holding only a certificate.
        let error = server_config(&[TlsConfig {
            cert: good.cert.clone(),
            key: good.cert.clone(),
        }])
        .unwrap_err();
        assert!(
            matches!(&error, TlsError::NoKey(path) if *path == good.cert),
            "{error}"
        );

        let error = server_config(&[TlsConfig {
            cert: good.cert.clone(),
            key: other.key.clone(),
        }])
        .unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("other.key") && text.contains("good.pem"),
            "{text}"
        );

        // One bad certificate in a list fails the whole set, naming it.
        let error = server_config(&[
            good.clone(),
            TlsConfig {
                cert: garbage,
                key: other.key,
            },
        ])
        .unwrap_err();
        assert!(error.to_string().contains("garbage.pem"), "{error}");

        // A certificate block whose content is not a certificate.
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = server_config(&[TlsConfig {
            cert: broken.clone(),
            key: good.key.clone(),
        }])
        .unwrap_err();
        assert!(error.to_string().contains("broken.pem"), "{error}");
    }

    /// Drive a handshake between `client` and `server` in memory.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn speaks_tls_1_3_and_1_2_with_alpn_h2_then_http_1_1() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let tls = write(dir.path(), "a", &ca.issue(&["a.test"]));
        let server_config = Arc::new(server_config(&[tls]).unwrap());
        assert_eq!(
            server_config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut client_config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            client_config.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
            let name = ServerName::try_from("a.test").unwrap();
            let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
            let mut server = ServerConnection::new(server_config.clone()).unwrap();
            handshake(&mut client, &mut server).unwrap();
            assert_eq!(client.protocol_version(), Some(version.version));
            // The server's preference decides.
            assert_eq!(client.alpn_protocol(), Some(&b"h2"[..]));
        }
    }

    /// A TLS 1.1 ClientHello without the `supported_versions` extension
    /// (what a TLS 1.0/1.1-only client sends): rustls clients cannot make one.
    const TLS11_CLIENT_HELLO: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0x39, // record: handshake, 57 bytes
        0x01, 0x00, 0x00, 0x35, // ClientHello, 53 bytes
        0x03, 0x02, // client_version: TLS 1.1
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
        25, 26, 27, 28, 29, 30, 31,   // random
        0x00, // no session id
        0x00, 0x02, 0xc0, 0x13, // one suite: ECDHE_RSA_WITH_AES_128_CBC_SHA
        0x01, 0x00, // null compression
        // signature_algorithms (rustls wants it before it looks at the version):
        // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04,
    ];

    #[test]
    fn refuses_a_tls_1_1_client_with_a_protocol_version_alert() {
        let dir = tempfile::tempdir().unwrap();
        let tls = write(dir.path(), "a", &Ca::new().issue(&["a.test"]));
        let mut server = ServerConnection::new(Arc::new(server_config(&[tls]).unwrap())).unwrap();
        server.read_tls(&mut &TLS11_CLIENT_HELLO[..]).unwrap();
        let error = server.process_new_packets().unwrap_err();
        assert!(
            matches!(error, rustls::Error::PeerIncompatible(_)),
            "{error:?}"
        );
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        // An alert record: fatal (2), protocol_version (70).
        assert_eq!(wire.first(), Some(&0x15), "{wire:?}");
        assert_eq!(&wire[wire.len() - 2..], &[2, 70], "{wire:?}");
        assert_eq!(VERSIONS.len(), 2);
        assert!(VERSIONS.iter().all(|v| matches!(
            v.version,
            rustls::ProtocolVersion::TLSv1_2 | rustls::ProtocolVersion::TLSv1_3
        )));
    }
}
