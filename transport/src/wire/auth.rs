//! Mutual authentication by challenge and response over a cluster secret (HMAC-SHA256).
//!
//! The client sends a fresh nonce in `Hello`; the server answers with its own nonce and
//! `HMAC(secret, "swblock/1 server" | client nonce | server nonce | features)`; the client
//! checks it (so it never talks to a server that does not know the secret) and answers with
//! `HMAC(secret, "swblock/1 client" | server nonce | client nonce)`, which the server checks
//! before it accepts any request. The labels keep one side's MAC from being replayed as the
//! other's, and each side's fresh nonce keeps an old exchange from being replayed. Without a
//! configured secret the key is empty: the exchange still runs, but proves nothing, which is
//! why a server without a secret listens on loopback only.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a MAC.
pub const MAC_LEN: usize = 32;

/// A fresh random challenge.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// A nonce from the operating system's random source.
    pub fn random() -> std::io::Result<Nonce> {
        let mut n = [0u8; NONCE_LEN];
        getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Nonce(n))
    }
}

/// Which side computes or checks a MAC.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that accepted the connection.
    Server,
    /// The side that opened it.
    Client,
}

/// Computes and checks the handshake's MACs for one secret.
#[derive(Clone)]
pub struct Authenticator {
    key: Vec<u8>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("has_secret", &!self.key.is_empty())
            .finish()
    }
}

impl Authenticator {
    /// An authenticator over `secret`; `None` means no secret (an empty key).
    pub fn new(secret: Option<&[u8]>) -> Self {
        Authenticator {
            key: secret.unwrap_or_default().to_vec(),
        }
    }

    /// Whether a secret is configured.
    pub fn has_secret(&self) -> bool {
        !self.key.is_empty()
    }

    fn mac(&self, role: Role, client: &Nonce, server: &Nonce, features: u64) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        match role {
            Role::Server => {
                mac.update(b"swblock/1 server");
                mac.update(&client.0);
                mac.update(&server.0);
                mac.update(&features.to_be_bytes());
            }
            Role::Client => {
                mac.update(b"swblock/1 client");
                mac.update(&server.0);
                mac.update(&client.0);
            }
        }
        mac
    }

    /// The MAC `role` sends for the two nonces.
    pub fn sign(&self, role: Role, client: &Nonce, server: &Nonce, features: u64) -> [u8; MAC_LEN] {
        self.mac(role, client, server, features)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the MAC `role` must send (compared in constant time).
    pub fn verify(
        &self,
        role: Role,
        client: &Nonce,
        server: &Nonce,
        features: u64,
        tag: &[u8; MAC_LEN],
    ) -> bool {
        self.mac(role, client, server, features)
            .verify_slice(tag)
            .is_ok()
    }
}
