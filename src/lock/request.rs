//! Typed, validated values the lock engine works with. Their constructors are the only place the
//! configured limits are enforced; the engine trusts them and never re-checks.

use std::{fmt, time::Duration};

use uuid::Uuid;

use crate::config::LockConfig;

/// What is wrong with a value, phrased to follow the field name: "`name`: must not be empty".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// Refuses text with a control character in it, naming the first one found.
    pub fn unless_printable(raw: &str) -> Result<(), Invalid> {
        match raw.chars().find(|c| c.is_control()) {
            Some(c) => Err(Invalid(format!(
                "must not contain control characters (found U+{:04X})",
                c as u32
            ))),
            None => Ok(()),
        }
    }
}

/// A lock name: 1..=max_name_len bytes of UTF-8, no control characters, no `{` or `}`.
///
/// Braces are refused because they delimit the Redis Cluster hash tag that keeps all keys of one
/// lock in one slot; a name starting with `}` would silently break that.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(String);

impl LockName {
    pub fn parse(raw: String, limits: &LockConfig) -> Result<Self, Invalid> {
        if raw.is_empty() {
            return Err(Invalid("must not be empty".into()));
        }
        let max = limits.max_name_len as usize;
        if raw.len() > max {
            return Err(Invalid(format!(
                "is {} bytes long, the limit is {max} bytes (max_name_len)",
                raw.len()
            )));
        }
        Invalid::unless_printable(&raw)?;
        if raw.contains(['{', '}']) {
            return Err(Invalid(
                "must not contain '{' or '}' (they delimit Redis hash tags)".into(),
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The secret that proves ownership of a hold: a random UUID v4 made by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(Uuid);

impl Token {
    pub fn generate() -> Self {
        Self(Uuid::new_v4())
    }

    /// The token as latchkey writes it into Redis (owner, `from`, waiter ids): 32 lower-case
    /// hex digits, without the dashes `Display` shows clients, so a held lock's hash stays
    /// small (see `src/lock/prelude.lua`). Written into `buf` (see `Uuid::encode_buffer`)
    /// without a formatter. `parse` takes either form.
    pub fn encode(self, buf: &mut [u8]) -> &str {
        self.0.simple().encode_lower(buf)
    }

    /// `encode`, owned: the id a waiter of this token has in Redis (its sorted-set entry, and
    /// the `w:ID` unlock message naming a fair waiter).
    pub fn waiter_id(self) -> String {
        self.encode(&mut Uuid::encode_buffer()).to_owned()
    }

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if raw.is_empty() {
            return Err(Invalid("is required: the token Acquire returned".into()));
        }
        Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| Invalid("is not a token latchkey issued (a UUID)".into()))
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A caller's id for one Release or re-entering Acquire (`request_id`): a UUID it picks fresh
/// for that call and sends again, unchanged, when it retries the call after an UNAVAILABLE or a
/// lost answer. Redis remembers the latest such id per lock (`op` in prelude.lua), so a retry
/// whose first run already counted is answered as that run was, not counted a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(u64);

impl RequestId {
    /// `None` for an empty field (the caller sent no id).
    pub fn parse(raw: &str) -> Result<Option<Self>, Invalid> {
        if raw.is_empty() {
            return Ok(None);
        }
        let uuid = Uuid::parse_str(raw).map_err(|_| {
            Invalid(
                "must be a UUID: a fresh one per call, the same one when retrying that call".into(),
            )
        })?;
        let (high, low) = uuid.as_u64_pair();
        Ok(Some(Self((high ^ low) >> 1)))
    }

    /// The id as the scripts store it: below 2^63, like the engine's own ids (`store::Op`).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// How long a grant lives unless renewed: min_lease..=max_lease, default_lease when unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(Duration);

impl Lease {
    pub fn parse(raw: Option<Duration>, limits: &LockConfig) -> Result<Self, Invalid> {
        let Some(lease) = raw else {
            return Ok(Self(limits.default_lease));
        };
        if lease < limits.min_lease {
            return Err(Invalid(format!(
                "{} is below the minimum lease of {} (min_lease)",
                show(lease),
                show(limits.min_lease)
            )));
        }
        if lease > limits.max_lease {
            return Err(Invalid(format!(
                "{} is above the maximum lease of {} (max_lease)",
                show(lease),
                show(limits.max_lease)
            )));
        }
        Ok(Self(lease))
    }

    pub fn get(self) -> Duration {
        self.0
    }

    /// The lease in whole milliseconds, Redis' resolution (at least 1).
    pub fn millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

/// How long a caller is willing to wait for a busy lock: zero (try once) ..= max_wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WaitTimeout(Duration);

impl WaitTimeout {
    pub fn parse(raw: Option<Duration>, limits: &LockConfig) -> Result<Self, Invalid> {
        let wait = raw.unwrap_or_default();
        if wait > limits.max_wait {
            return Err(Invalid(format!(
                "{} is above the maximum wait of {} (max_wait)",
                show(wait),
                show(limits.max_wait)
            )));
        }
        Ok(Self(wait))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

/// A re-entering Acquire: the token of the hold it re-enters, and the caller's id for it, so
/// that a retry of it is not counted twice (a fresh Acquire has no use for one).
#[derive(Debug, Clone, Copy)]
pub struct Reentry {
    pub token: Token,
    pub request_id: Option<RequestId>,
}

/// An Acquire as the engine sees it.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub name: LockName,
    pub lease: Lease,
    pub wait: WaitTimeout,
    /// Some: re-enter the hold this token owns (never waits).
    pub reenter: Option<Reentry>,
    /// Grant in queue order (see `lock::fair`).
    pub fair: bool,
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits() -> LockConfig {
        Config::for_redis("127.0.0.1:0".parse().unwrap(), "redis://127.0.0.1:1").locks
    }

    #[test]
    fn names_are_bounded_in_bytes_not_characters() {
        let limits = limits();
        assert!(LockName::parse("é".repeat(128), &limits).is_ok()); // 256 bytes
        let err = LockName::parse("é".repeat(129), &limits).unwrap_err();
        assert!(
            err.0.contains("258 bytes") && err.0.contains("256"),
            "{err}"
        );
    }

    #[test]
    fn names_with_control_characters_or_braces_are_refused() {
        let limits = limits();
        assert!(LockName::parse("a\u{0}b".into(), &limits).is_err());
        assert!(LockName::parse("a\nb".into(), &limits).is_err());
        assert!(LockName::parse("}a".into(), &limits).is_err());
        assert!(LockName::parse("orders/42 ✓".into(), &limits).is_ok());
    }

    #[test]
    fn a_token_goes_to_redis_without_dashes_and_is_the_same_token_in_either_form() {
        let token = Token::generate();
        let (shown, in_redis) = (token.to_string(), token.waiter_id());
        assert_eq!((shown.len(), in_redis.len()), (36, 32));
        assert_eq!(shown.replace('-', ""), in_redis);
        assert_eq!(Token::parse(&shown).unwrap(), token);
        assert_eq!(Token::parse(&in_redis).unwrap(), token);
    }

    #[test]
    fn a_request_id_is_an_optional_uuid_in_either_form() {
        assert_eq!(RequestId::parse("").unwrap(), None);
        let uuid = Uuid::new_v4();
        let id = RequestId::parse(&uuid.to_string()).unwrap().unwrap();
        assert_eq!(
            RequestId::parse(&uuid.simple().to_string()).unwrap(),
            Some(id)
        );
        assert!(id.get() < 1 << 63);
        let other = RequestId::parse(&Uuid::new_v4().to_string()).unwrap();
        assert_ne!(other, Some(id));
        assert!(RequestId::parse("retry-1").unwrap_err().0.contains("UUID"));
    }

    #[test]
    fn an_unset_lease_is_the_default_and_limits_are_inclusive() {
        let limits = limits();
        assert_eq!(
            Lease::parse(None, &limits).unwrap().get(),
            limits.default_lease
        );
        assert!(Lease::parse(Some(limits.min_lease), &limits).is_ok());
        assert!(Lease::parse(Some(limits.max_lease), &limits).is_ok());
        assert!(Lease::parse(Some(Duration::ZERO), &limits).is_err());
        assert!(Lease::parse(Some(limits.max_lease + Duration::from_millis(1)), &limits).is_err());
    }
}
