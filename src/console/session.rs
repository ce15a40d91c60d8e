//! Console sessions: an operator logs in once with a token and gets a random session id in an
//! HttpOnly, SameSite=Strict cookie; every form carries the session's CSRF token.
//!
//! Sessions live in memory: a restart of `sagad` logs operators out, which costs a login and
//! keeps the tokens themselves out of the database and out of the browser after login.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::api::auth::Caller;

/// Cookie that holds the session id.
pub const COOKIE: &str = "saga_console";
/// A session ends this long after login, whatever happens.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// More sessions than this and the oldest are dropped, so that a login loop cannot grow memory.
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
    created: Instant,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        same_token(presented, &self.csrf)
    }
}

#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

pub(super) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// A new session for `caller`; returns its id (for the cookie).
    pub fn open(&self, caller: Caller) -> (String, Session) {
        let id = random_token();
        let session = Session {
            caller,
            csrf: random_token(),
            created: Instant::now(),
        };
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.created.elapsed() < LIFETIME);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(s) if s.created.elapsed() < LIFETIME => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Cookie that carries the login form's CSRF token (a double submit: a site that cannot read
/// this cookie cannot put its value in the form, so it cannot log a browser in as itself).
pub const LOGIN_COOKIE: &str = "saga_login";

/// The `Set-Cookie` value for the login form's token, valid for that form only.
pub fn set_login_cookie(nonce: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{LOGIN_COOKIE}={nonce}; Path=/login; HttpOnly; SameSite=Strict; Max-Age=900{secure}")
}

/// Whether two tokens are equal (constant time) and not empty.
pub fn same_token(a: &str, b: &str) -> bool {
    !a.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The `Set-Cookie` value for a session id (`None`: clear it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::Scope;

    fn op() -> Caller {
        Caller {
            name: "alice".into(),
            scope: Scope::Operator,
        }
    }

    #[test]
    fn sessions_open_find_and_close() {
        let s = Sessions::default();
        let (id, session) = s.open(op());
        assert_eq!(id.len(), 64);
        assert_ne!(id, session.csrf);
        let found = s.get(&id).unwrap();
        assert!(found.csrf_matches(&session.csrf));
        assert!(!found.csrf_matches(""));
        assert!(!found.csrf_matches(&session.csrf[1..]));
        assert!(s.get("nope").is_none());
        s.close(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn cookies_are_parsed_and_set_strictly() {
        assert_eq!(cookie("a=1; saga_console=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("saga_consolex=1", COOKIE), None);
        let set = set_cookie(Some("abc"), true);
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.ends_with("Secure")
        );
        assert!(!set_cookie(Some("abc"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}
