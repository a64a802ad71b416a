//! Who a signed-in user is, as flowgate hands it on: the `Identity` a
//! session names (resolved against the live directory on every decision),
//! and the header presets that carry it upstream (`default`, `authentik`,
//! `oauth2-proxy`). Both lanes of the proxy write these names and values.

use std::borrow::Cow;

use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// Who a session belongs to: what the upstream is told in headers and what
/// `users/me` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub username: String,
    pub name: String,
    pub email: String,
    pub groups: Vec<String>,
    /// Stable opaque id (hex SHA-256), authentik's `uid`.
    pub uid: String,
    pub pk: u64,
    #[serde(default)]
    pub is_superuser: bool,
    /// The identity as header values, made on the first proxied request and
    /// shared by all the session's requests after it.
    #[serde(skip)]
    pub header_values: HeaderValues,
}

/// Lazily built header values of an identity. Not part of what an identity
/// is: two identities compare equal whatever their caches hold.
#[derive(Clone, Default)]
pub struct HeaderValues(std::sync::OnceLock<IdentityValues>);

/// `None` for a value that cannot be a header value (control characters).
#[derive(Clone)]
pub struct IdentityValues {
    pub username: Option<http::HeaderValue>,
    pub name: Option<http::HeaderValue>,
    pub email: Option<http::HeaderValue>,
    pub uid: Option<http::HeaderValue>,
    /// Groups joined with `,` (most tools) and with `|` (authentik).
    pub groups_comma: Option<http::HeaderValue>,
    pub groups_pipe: Option<http::HeaderValue>,
}

impl Identity {
    /// A user for unit tests: `name`, in `groups`.
    #[cfg(test)]
    pub(crate) fn test(name: &str, groups: &[&str]) -> Identity {
        Identity {
            username: name.into(),
            name: name.into(),
            email: format!("{name}@example.test"),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            uid: "u".into(),
            pk: 1,
            is_superuser: false,
            header_values: Default::default(),
        }
    }

    pub fn values(&self) -> &IdentityValues {
        self.header_values.0.get_or_init(|| {
            let value = |s: &str| http::HeaderValue::from_str(s).ok();
            IdentityValues {
                username: value(&self.username),
                name: value(&self.name),
                email: value(&self.email),
                uid: value(&self.uid),
                groups_comma: value(&self.groups.join(",")),
                groups_pipe: value(&self.groups.join("|")),
            }
        })
    }
}

impl PartialEq for HeaderValues {
    fn eq(&self, _: &HeaderValues) -> bool {
        true
    }
}

impl Eq for HeaderValues {}

impl std::fmt::Debug for HeaderValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeaderValues")
    }
}

const X_FORWARDED_USER: HeaderName = HeaderName::from_static("x-forwarded-user");
const X_FORWARDED_EMAIL: HeaderName = HeaderName::from_static("x-forwarded-email");
const X_FORWARDED_GROUPS: HeaderName = HeaderName::from_static("x-forwarded-groups");
const X_FORWARDED_PREFERRED_USERNAME: HeaderName =
    HeaderName::from_static("x-forwarded-preferred-username");

/// One value of an identity, as a header value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Username,
    Name,
    Email,
    Uid,
    GroupsComma,
    GroupsPipe,
}

impl Field {
    pub fn of(self, values: &IdentityValues) -> Option<&HeaderValue> {
        match self {
            Field::Username => values.username.as_ref(),
            Field::Name => values.name.as_ref(),
            Field::Email => values.email.as_ref(),
            Field::Uid => values.uid.as_ref(),
            Field::GroupsComma => values.groups_comma.as_ref(),
            Field::GroupsPipe => values.groups_pipe.as_ref(),
        }
    }
}

static DEFAULT_HEADERS: [(HeaderName, Field); 4] = [
    (X_FORWARDED_USER, Field::Username),
    (X_FORWARDED_EMAIL, Field::Email),
    (X_FORWARDED_GROUPS, Field::GroupsComma),
    (X_FORWARDED_PREFERRED_USERNAME, Field::Username),
];
// authentik joins groups with `|` (PROTOCOL.md §5.4).
static AUTHENTIK_HEADERS: [(HeaderName, Field); 5] = [
    (
        HeaderName::from_static("x-authentik-username"),
        Field::Username,
    ),
    (HeaderName::from_static("x-authentik-email"), Field::Email),
    (
        HeaderName::from_static("x-authentik-groups"),
        Field::GroupsPipe,
    ),
    (HeaderName::from_static("x-authentik-name"), Field::Name),
    (HeaderName::from_static("x-authentik-uid"), Field::Uid),
];
static OAUTH2_PROXY_HEADERS: [(HeaderName, Field); 4] = [
    (
        HeaderName::from_static("x-auth-request-user"),
        Field::Username,
    ),
    (
        HeaderName::from_static("x-auth-request-email"),
        Field::Email,
    ),
    (
        HeaderName::from_static("x-auth-request-groups"),
        Field::GroupsComma,
    ),
    (
        HeaderName::from_static("x-auth-request-preferred-username"),
        Field::Username,
    ),
];

// Authelia's names (its forward-auth answer), groups comma-separated.
static AUTHELIA_HEADERS: [(HeaderName, Field); 4] = [
    (HeaderName::from_static("remote-user"), Field::Username),
    (HeaderName::from_static("remote-groups"), Field::GroupsComma),
    (HeaderName::from_static("remote-email"), Field::Email),
    (HeaderName::from_static("remote-name"), Field::Name),
];

/// Which identity headers a route sends upstream (DESIGN.md, "Identity
/// headers"): the names of a tool people migrate from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderPreset {
    /// `X-Forwarded-User`, `-Email`, `-Groups`, `-Preferred-Username`.
    Default,
    /// authentik outpost names: `X-authentik-username` …
    Authentik,
    /// oauth2-proxy names: `X-Auth-Request-User` …
    OAuth2Proxy,
    /// Authelia names: `Remote-User`, `Remote-Groups`, `Remote-Email`, `Remote-Name`.
    Authelia,
}

/// The identity headers a route sends: each name, and the value it carries.
/// A preset's, or names of the route's own (`headers = { user = … }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSet {
    fields: Cow<'static, [(HeaderName, Field)]>,
}

impl HeaderSet {
    pub fn preset(preset: HeaderPreset) -> HeaderSet {
        let fields: &'static [(HeaderName, Field)] = match preset {
            HeaderPreset::Default => &DEFAULT_HEADERS,
            HeaderPreset::Authentik => &AUTHENTIK_HEADERS,
            HeaderPreset::OAuth2Proxy => &OAUTH2_PROXY_HEADERS,
            HeaderPreset::Authelia => &AUTHELIA_HEADERS,
        };
        HeaderSet {
            fields: Cow::Borrowed(fields),
        }
    }

    /// Names of the route's own. Clients' copies of them are stripped like
    /// every known identity header.
    pub fn custom(fields: Vec<(HeaderName, Field)>) -> HeaderSet {
        HeaderSet {
            fields: Cow::Owned(fields),
        }
    }

    pub fn fields(&self) -> &[(HeaderName, Field)] {
        &self.fields
    }

    /// The names of the route's own, which no list of known identity
    /// headers holds (empty for a preset: every preset name is on them).
    pub fn own_names(&self) -> &[(HeaderName, Field)] {
        match &self.fields {
            Cow::Borrowed(_) => &[],
            Cow::Owned(fields) => fields,
        }
    }
}

impl Default for HeaderSet {
    fn default() -> HeaderSet {
        HeaderSet::preset(HeaderPreset::Default)
    }
}
