//! Registry requests and whose credentials they carry: the token dance and basic auth on a
//! 401 (this agent's configured credentials, tokens cached per registry and scope), and the
//! pull-right check for a mirror client's own credentials (`Client::may_pull`), which never
//! uses this agent's and keeps no token.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, Response, StatusCode, Url};
use shoal_proto::Digest;
use tokio::time::Instant;

use super::{Auth, Client, Request, TOKEN_RESPONSE_MAX, accept_headers, parse_manifest_reference};
use crate::OriginError;
use crate::auth::{Challenge, Known, Token, TokenResponse, parse_challenges};
use crate::config::{Credentials, RegistryConfig};
use crate::http::{check_status, display_url, parse_http_url, read_capped, send, status_error};
use crate::reference::{validate_registry, validate_repository};

/// What [`Client::may_pull`] asks about.
#[derive(Clone, Copy, Debug)]
pub enum Pullable<'a> {
    /// A manifest by tag or digest.
    Manifest(&'a str),
    Blob(&'a Digest),
}

/// What [`Client::may_pull`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullRight {
    /// The registry serves it to these credentials (or to anyone).
    Allowed,
    /// The registry refused these credentials (401, 403).
    Refused,
    /// The registry has no such thing for these credentials (404); `challenged`: it asked
    /// for credentials on the way (a private repository may hide behind a 404).
    Unknown { challenged: bool },
}

/// Whose credentials a registry request carries.
#[derive(Clone, Copy)]
pub(super) enum Principal<'a> {
    /// This agent's: the configured ones, with tokens cached and shared.
    Node,
    /// A mirror client's own (None: anonymous): never the configured ones, and no token
    /// kept.
    Client(Option<&'a Credentials>),
}

impl Client {
    /// Sends a request to `<registry base>/v2/<repository>/<path>`, going through the token
    /// or basic-auth flow on a 401, and returns the successful response.
    pub(super) async fn registry_request(
        &self,
        method: Method,
        registry: &str,
        repository: &str,
        path: &str,
        headers: HeaderMap,
        who: Principal<'_>,
    ) -> Result<Response, OriginError> {
        let mut challenged = false;
        self.exchange(
            method,
            registry,
            repository,
            path,
            headers,
            who,
            &mut challenged,
        )
        .await
    }

    /// [`Client::registry_request`], setting `challenged` if the registry asked for
    /// credentials on the way (a 401 to the first attempt).
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        method: Method,
        registry: &str,
        repository: &str,
        path: &str,
        headers: HeaderMap,
        who: Principal<'_>,
        challenged: &mut bool,
    ) -> Result<Response, OriginError> {
        let (settings, url, shown) = self.registry_url(registry, repository, path)?;
        let default_scope = format!("repository:{repository}:pull");

        let tokens = &self.inner.tokens;
        let node = matches!(who, Principal::Node);
        let known = if node {
            tokens.lookup(registry, &default_scope, Instant::now())
        } else {
            None
        };
        let (first_auth, sent_key) = match known {
            Some(Known::Bearer(token)) => (Auth::Bearer(token), Some(default_scope.clone())),
            Some(Known::Basic) => match self.credentials(&settings, who)? {
                Some(c) => (Auth::Basic(c), None),
                None => (Auth::Anonymous, None),
            },
            None => (Auth::Anonymous, None),
        };
        let response = self
            .send_paced(
                &settings,
                Request(&method, &url, &headers, &first_auth, &shown),
            )
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return check_status(response, &shown, self.timeout()).await;
        }
        *challenged = true;

        let challenges: Vec<Challenge> = response
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm.clone(), service.clone(), scope.clone())),
            Challenge::Basic => None,
        });
        let retry_auth = if let Some((realm, service, scope)) = bearer {
            let scope = scope.unwrap_or(default_scope);
            let cached = if sent_key.as_deref() == Some(scope.as_str()) {
                // The token we just sent was refused: it expired or was revoked early.
                tokens.forget(registry, &scope);
                None
            } else if node {
                tokens.lookup(registry, &scope, Instant::now())
            } else {
                None
            };
            let token = match cached {
                Some(Known::Bearer(token)) => token,
                _ => {
                    let (token, lifetime) = self
                        .fetch_token(&settings, &realm, service.as_deref(), &scope, who)
                        .await?;
                    if node {
                        tokens.store(registry, &scope, token.clone(), lifetime, Instant::now());
                    }
                    token
                }
            };
            Auth::Bearer(token)
        } else if challenges.contains(&Challenge::Basic) {
            match self.credentials(&settings, who)? {
                Some(creds) => Auth::Basic(creds),
                None => {
                    return Err(OriginError::Unauthorized(format!(
                        "{shown}: registry {registry} asks for basic auth and none is configured"
                    )));
                }
            }
        } else {
            return Err(status_error(response, &shown, self.timeout()).await);
        };
        let is_basic = matches!(retry_auth, Auth::Basic(_));
        let response = self
            .send_paced(
                &settings,
                Request(&method, &url, &headers, &retry_auth, &shown),
            )
            .await?;
        if node && is_basic && response.status() != StatusCode::UNAUTHORIZED {
            tokens.mark_basic(registry);
        }
        check_status(response, &shown, self.timeout()).await
    }

    /// The settings of `registry`, the URL of `path` in `repository` there, and that URL as
    /// errors show it.
    fn registry_url(
        &self,
        registry: &str,
        repository: &str,
        path: &str,
    ) -> Result<(RegistryConfig, Url, String), OriginError> {
        validate_registry(registry)?;
        validate_repository(repository)?;
        let settings = self.inner.config.registry(registry);
        let url = format!("{}/v2/{repository}/{path}", settings.base_url());
        let url = Url::parse(&url)
            .map_err(|e| OriginError::Invalid(format!("registry URL {url:?}: {e}")))?;
        let shown = display_url(&url);
        Ok((settings, url, shown))
    }

    /// The credentials `who` sends to `settings`' registry.
    fn credentials(
        &self,
        settings: &RegistryConfig,
        who: Principal<'_>,
    ) -> Result<Option<Credentials>, OriginError> {
        match who {
            Principal::Node => settings.credentials(self.inner.config.auth_file.as_deref()),
            Principal::Client(c) => Ok(c.cloned()),
        }
    }

    /// Whether `credentials` (a mirror client's own; None: anonymous) may pull `what` from
    /// `repository` at `registry`: a `HEAD` with them alone (the token dance included),
    /// never with this client's configured credentials, and no token kept.
    pub async fn may_pull(
        &self,
        registry: &str,
        repository: &str,
        what: Pullable<'_>,
        credentials: Option<&Credentials>,
    ) -> Result<PullRight, OriginError> {
        let (path, headers) = match what {
            Pullable::Manifest(reference) => {
                parse_manifest_reference(reference)?;
                (format!("manifests/{reference}"), accept_headers(&[])?)
            }
            Pullable::Blob(digest) => (format!("blobs/{digest}"), HeaderMap::new()),
        };
        // A client's request goes anonymously first (no token of its own is kept): an open
        // registry answers at once, and the 401 of one that is not says it asked.
        let mut challenged = false;
        let who = Principal::Client(credentials);
        let answer = self
            .exchange(
                Method::HEAD,
                registry,
                repository,
                &path,
                headers,
                who,
                &mut challenged,
            )
            .await;
        match answer {
            Ok(_) => Ok(PullRight::Allowed),
            Err(OriginError::Unauthorized(_)) => Ok(PullRight::Refused),
            Err(OriginError::NotFound(_)) => Ok(PullRight::Unknown { challenged }),
            Err(e) => Err(e),
        }
    }

    /// Asks the token endpoint `realm` for a token for `scope`, with the registry's
    /// credentials if configured. Returns the token and how long it lives.
    async fn fetch_token(
        &self,
        settings: &RegistryConfig,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        who: Principal<'_>,
    ) -> Result<(Token, Duration), OriginError> {
        let mut url = parse_http_url(realm).map_err(|e| {
            OriginError::Unauthorized(format!(
                "registry {} sent an unusable token realm: {e}",
                settings.host
            ))
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        let shown = display_url(&url);
        // The registry names its realm: credentials go only where they cannot be read on
        // the way or collected by a host the registry merely pointed at, i.e. over https,
        // or to the registry's own host.
        let registry_host = Url::parse(&settings.base_url())
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        let realm_host = url.host_str().map(str::to_ascii_lowercase);
        let safe_realm = url.scheme() == "https" || realm_host == registry_host;
        let configured = self.credentials(settings, who)?;
        let withheld = configured.is_some() && !safe_realm;
        if withheld {
            tracing::warn!(registry = %settings.host, realm = %shown, "the registry's token realm is plain http on another host: asking it anonymously, the credentials withheld");
        }
        let credentials = configured.filter(|_| !withheld);
        let mut request = self.inner.http.get(url);
        if let Some(c) = &credentials {
            request = request.basic_auth(&c.username, Some(&c.password));
        }
        tracing::debug!(
            registry = %settings.host,
            realm = %shown,
            scope,
            with_credentials = credentials.is_some(),
            "fetching registry token"
        );
        let response = send(request, &shown, self.timeout()).await?;
        if matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            let who = match &credentials {
                Some(c) => format!("the credentials of user {:?}", c.username),
                None if withheld => "anonymous access (the configured credentials are only sent to an https realm or the registry's own host)".to_string(),
                None => "anonymous access (no credentials configured)".to_string(),
            };
            let status = response.status();
            return Err(OriginError::Unauthorized(format!(
                "token endpoint {shown} answered {status} to {who} for registry {} scope {scope}",
                settings.host
            )));
        }
        let response = check_status(response, &shown, self.timeout()).await?;
        let bytes = read_capped(
            response,
            &shown,
            "token response",
            TOKEN_RESPONSE_MAX,
            self.timeout(),
        )
        .await?;
        let parsed: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| {
            OriginError::Unauthorized(format!("token endpoint {shown} sent no usable JSON: {e}"))
        })?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                OriginError::Unauthorized(format!("token endpoint {shown} sent no token"))
            })?;
        let lifetime = match parsed.expires_in {
            Some(secs) if secs > 0 => Duration::from_secs(secs),
            _ => crate::auth::DEFAULT_TOKEN_LIFETIME,
        };
        Ok((Token(token), lifetime))
    }
}
