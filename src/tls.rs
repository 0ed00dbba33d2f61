//! The process' one rustls crypto provider.
//!
//! Every TLS configuration (proxy listeners, upstream and Kubernetes clients, test
//! clients) uses the provider returned here; `install_default_provider` makes it the
//! process default so that crates which ask rustls for the default get the same one.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider Portcullis uses: *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    match CryptoProvider::get_default() {
        Some(p) => p.clone(),
        None => Arc::new(rustls::crypto::ring::default_provider()),
    }
}

/// Installs [`provider`] as the process default. Safe to call more than once.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
