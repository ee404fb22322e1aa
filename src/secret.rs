//! A secret string (JWT keys, API keys, provider credentials): its `Debug` never shows the
//! value, so it can sit in any config or settings struct that is logged.

/// A secret. Read it with [`Secret::expose`], only where it is used (signing, verification).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The value, for signing or verification only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// For clap: `--api-keys` and the JWT secret parse into a [`Secret`].
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_value() {
        let s: Secret = "hunter2-very-secret".parse().unwrap();
        assert_eq!(s.expose(), "hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(s)).contains("hunter2"));
    }
}
