//! Authentication: bearer tokens with scopes, checked by an interceptor in front of each service.
//!
//! Tokens come from a TOML file and/or the environment. They are compared in constant time
//! against every configured token (no early exit that would leak which one matched, or how much
//! of it), and never logged: [`Secret`] does not print.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Start sagas, report step results, read sagas.
    Participant,
    /// Everything, including repairs.
    Operator,
}

/// A string that never appears in logs or debug output.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Who made a request, put in the request's extensions for the handlers (repairs record it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub scope: Scope,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    scope: Scope,
    token: Secret,
    /// For a participant token: the only participants whose results it may report.
    participants: Option<Vec<String>>,
}

/// The participants a token may report step results for, put in the request's extensions next
/// to the [`Caller`] when the token is bound to some (absent: any participant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundParticipants(pub Vec<String>);

#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<(Caller, Secret, Option<BoundParticipants>)>,
}

/// Shorter tokens (in bytes) are refused at start-up: they can be guessed.
const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    pub fn add(&mut self, name: &str, scope: Scope, token: Secret) -> Result<(), String> {
        self.add_bound(name, scope, token, None)
    }

    /// Like [`Tokens::add`], for a participant token that may only report the results of
    /// commands sent to `participants`.
    pub fn add_bound(
        &mut self,
        name: &str,
        scope: Scope,
        token: Secret,
        participants: Option<Vec<String>>,
    ) -> Result<(), String> {
        if name.trim().is_empty() {
            return Err("a token has an empty name".into());
        }
        if token.0.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "token {name:?} is shorter than {MIN_TOKEN_LEN} bytes"
            ));
        }
        if self.entries.iter().any(|(c, _, _)| c.name == name) {
            return Err(format!("token name {name:?} is used twice"));
        }
        // One value under two names would make the caller (and its scope) ambiguous.
        if let Some((other, _, _)) = self
            .entries
            .iter()
            .find(|(_, s, _)| bool::from(s.0.as_bytes().ct_eq(token.0.as_bytes())))
        {
            return Err(format!(
                "tokens {:?} and {name:?} have the same value",
                other.name
            ));
        }
        let bound = match participants {
            None => None,
            Some(_) if scope != Scope::Participant => {
                return Err(format!(
                    "token {name:?}: only participant tokens can be bound to participants"
                ));
            }
            Some(list) if list.is_empty() || list.iter().any(|p| p.trim().is_empty()) => {
                return Err(format!(
                    "token {name:?}: `participants` must list participant names"
                ));
            }
            Some(list) => Some(BoundParticipants(list)),
        };
        self.entries.push((
            Caller {
                name: name.to_string(),
                scope,
            },
            token,
            bound,
        ));
        Ok(())
    }

    /// Loads `[[token]]` entries (`name`, `scope` = "participant" | "operator", `token`, and
    /// optionally `participants` for a participant token). A file without any token is refused:
    /// it would silently turn authentication off.
    pub fn load_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: TokenFile =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        if file.token.is_empty() {
            return Err(format!(
                "{}: no [[token]] entry; an empty file would disable authentication",
                path.display()
            ));
        }
        for t in file.token {
            self.add_bound(&t.name, t.scope, t.token, t.participants)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The caller owning `presented`, checking every token so the time taken does not depend on
    /// which one (if any) matches.
    pub fn authenticate(&self, presented: &str) -> Option<&Caller> {
        self.authenticate_bound(presented).map(|(c, _)| c)
    }

    /// The caller owning `presented` and the participants its token is bound to, if any.
    pub fn authenticate_bound(
        &self,
        presented: &str,
    ) -> Option<(&Caller, Option<&BoundParticipants>)> {
        let mut found = None;
        for (caller, secret, bound) in &self.entries {
            let equal: bool = secret.0.as_bytes().ct_eq(presented.as_bytes()).into();
            if equal {
                found = Some((caller, bound.as_ref()));
            }
        }
        found
    }
}

/// Checks the bearer token and the scope a service needs. With no tokens configured, every
/// caller is an anonymous operator (local development; `sagad` warns loudly at start-up).
#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Tokens>,
    required: Scope,
}

impl Authenticator {
    pub fn new(tokens: Arc<Tokens>, required: Scope) -> Self {
        Authenticator { tokens, required }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = if self.tokens.is_empty() {
            Caller {
                name: "anonymous".into(),
                scope: Scope::Operator,
            }
        } else {
            let header = req.metadata().get("authorization").ok_or_else(|| {
                Status::unauthenticated(
                    "missing bearer token (metadata `authorization: Bearer <token>`)",
                )
            })?;
            let presented = header
                .to_str()
                .ok()
                .and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                })
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
                })?;
            let (caller, bound) = self
                .tokens
                .authenticate_bound(presented.trim())
                .ok_or_else(|| Status::unauthenticated("invalid token"))?;
            if caller.scope < self.required {
                return Err(Status::permission_denied(format!(
                    "token {:?} has scope {:?}; this needs {:?}",
                    caller.name, caller.scope, self.required
                )));
            }
            if let Some(bound) = bound {
                req.extensions_mut().insert(bound.clone());
            }
            caller.clone()
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller an interceptor identified (anonymous when the extension is missing, which only
/// happens for services mounted without one).
pub fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or(Caller {
        name: "anonymous".into(),
        scope: Scope::Participant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        let mut t = Tokens::default();
        t.add(
            "ops",
            Scope::Operator,
            Secret::new("operator-token-0123456789"),
        )
        .unwrap();
        t.add(
            "shop",
            Scope::Participant,
            Secret::new("participant-token-0123456789"),
        )
        .unwrap();
        t
    }

    fn call(auth: &mut Authenticator, header: Option<&str>) -> Result<Caller, Status> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(|r| caller(&r))
    }

    #[test]
    fn tokens_are_checked_with_their_scope() {
        let tokens = Arc::new(tokens());
        let mut admin = Authenticator::new(tokens.clone(), Scope::Operator);
        let mut sagas = Authenticator::new(tokens, Scope::Participant);
        assert_eq!(
            call(&mut admin, Some("Bearer operator-token-0123456789"))
                .unwrap()
                .name,
            "ops"
        );
        assert_eq!(
            call(&mut sagas, Some("Bearer operator-token-0123456789"))
                .unwrap()
                .scope,
            Scope::Operator
        );
        assert_eq!(
            call(&mut sagas, Some("Bearer participant-token-0123456789"))
                .unwrap()
                .name,
            "shop"
        );
        let denied = call(&mut admin, Some("Bearer participant-token-0123456789")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for bad in [
            None,
            Some("Bearer nope"),
            Some("operator-token-0123456789"),
            Some("Basic x"),
        ] {
            assert_eq!(
                call(&mut sagas, bad).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn weak_or_duplicate_tokens_are_refused_and_secrets_do_not_print() {
        let mut t = tokens();
        assert!(t.add("short", Scope::Operator, Secret::new("abc")).is_err());
        assert!(
            t.add(
                "ops",
                Scope::Operator,
                Secret::new("another-long-token-123")
            )
            .is_err()
        );
        assert_eq!(
            format!("{:?}", Secret::new("operator-token-0123456789")),
            "***"
        );
        assert!(!format!("{t:?}").contains("operator-token"));
    }

    #[test]
    fn shared_values_empty_names_short_bytes_and_empty_files_are_refused() {
        let mut t = tokens();
        let e = t
            .add(
                "copy",
                Scope::Participant,
                Secret::new("operator-token-0123456789"),
            )
            .unwrap_err();
        assert!(e.contains("same value"), "{e}");
        assert!(
            t.add(" ", Scope::Operator, Secret::new("a-long-enough-token-123"))
                .is_err()
        );
        // 15 bytes, whatever the character count.
        assert!(
            t.add("short", Scope::Operator, Secret::new("ééééééé1"))
                .unwrap_err()
                .contains("bytes")
        );
        assert!(
            t.add_bound(
                "ops2",
                Scope::Operator,
                Secret::new("another-operator-token-1"),
                Some(vec!["payment".into()])
            )
            .is_err()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "# nobody yet\n").unwrap();
        let e = Tokens::default().load_file(&path).unwrap_err();
        assert!(
            e.contains("tokens.toml") && e.contains("no [[token]]"),
            "{e}"
        );
    }

    #[test]
    fn a_bound_participant_token_carries_its_participants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            "[[token]]\nname = \"pay\"\nscope = \"participant\"\n\
             token = \"payment-token-0123456789\"\nparticipants = [\"payment\"]\n",
        )
        .unwrap();
        let mut t = Tokens::default();
        t.load_file(&path).unwrap();
        let mut auth = Authenticator::new(Arc::new(t), Scope::Participant);
        let mut req = Request::new(());
        req.metadata_mut().insert(
            "authorization",
            "Bearer payment-token-0123456789".parse().unwrap(),
        );
        let req = auth.call(req).unwrap();
        assert_eq!(
            req.extensions().get::<BoundParticipants>(),
            Some(&BoundParticipants(vec!["payment".into()]))
        );
    }

    #[test]
    fn without_tokens_everyone_is_an_anonymous_operator() {
        let mut auth = Authenticator::new(Arc::new(Tokens::default()), Scope::Operator);
        assert_eq!(call(&mut auth, None).unwrap().scope, Scope::Operator);
    }

    #[test]
    fn a_tokens_file_loads_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            "[[token]]\nname = \"a\"\nscope = \"operator\"\ntoken = \"0123456789abcdef0\"\n",
        )
        .unwrap();
        let mut t = Tokens::default();
        t.load_file(&path).unwrap();
        assert_eq!(t.len(), 1);
        std::fs::write(
            &path,
            "[[token]]\nname = \"a\"\nscope = \"admin\"\ntoken = \"0123456789abcdef0\"\n",
        )
        .unwrap();
        let e = Tokens::default().load_file(&path).unwrap_err();
        assert!(e.contains("tokens.toml") && e.contains("admin"), "{e}");
    }
}
