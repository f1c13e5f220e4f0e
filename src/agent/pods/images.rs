//! Image pulls as the kubelet makes them: by `imagePullPolicy`, one pull per image at a time
//! (in the background, so that a slow registry holds no worker), and a back-off per image
//! after a failure (`ErrImagePull`, then `ImagePullBackOff`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::registries::{Credentials, Registries};
use crate::agent::runtime::{ImageInfo, Runtime};

/// A pull that has finished this recently satisfies `Always` (the pods that asked for it
/// while it ran start with it).
const FRESH: Duration = Duration::from_secs(10);

enum State {
    Pulling,
    Done { at: Instant },
    Failed { message: String, at: Instant, retry_at: Instant, backoff: Duration, failures: u32 },
}

/// What a container can do about its image now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensure {
    Ready {
        info: ImageInfo,
        pulled: Option<Duration>,
    },
    /// A pull is under way (`started`: this call started it).
    Pulling {
        started: bool,
    },
    /// The image cannot be had: the reason (`ErrImagePull`, `ErrImageNeverPull`,
    /// `ImagePullBackOff`), the message, and which failure this is (a new one is reported).
    Failed {
        reason: &'static str,
        message: String,
        failure: u32,
        /// When it failed.
        at: Instant,
    },
}

pub struct Puller {
    runtime: Arc<dyn Runtime>,
    registries: Arc<Registries>,
    node: String,
    base: Duration,
    max: Duration,
    states: Mutex<HashMap<String, State>>,
    /// How long each finished pull took, by image.
    took: Mutex<HashMap<String, Duration>>,
}

impl Puller {
    pub fn new(runtime: Arc<dyn Runtime>, registries: Arc<Registries>, node: &str, base: Duration) -> Puller {
        Puller {
            runtime,
            registries,
            node: node.to_string(),
            base: base.max(Duration::from_millis(100)),
            max: Duration::from_secs(300),
            states: Mutex::new(HashMap::new()),
            took: Mutex::new(HashMap::new()),
        }
    }

    /// Decides, for `image` (as the pod spec says it) under `policy`, with the pod's
    /// pull-secret credentials.
    pub async fn ensure(
        self: &Arc<Self>,
        image: &str,
        policy: &str,
        secrets: &HashMap<String, Credentials>,
    ) -> Result<Ensure, crate::agent::runtime::RuntimeError> {
        let name = crate::agent::runtime::normalize_image(image);
        let present = self.runtime.image(&name).await?;
        let sources = self.registries.sources(&name, secrets);
        let offline = matches!(&sources, Ok(s) if s.is_empty());
        // Pulls with different credentials are different pulls (one failing is no reason to
        // hold back the other).
        let key = match &sources {
            Ok(s) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                for src in s {
                    (&src.host, &src.repository, &src.auth).hash(&mut h);
                }
                format!("{name} {:016x}", h.finish())
            }
            Err(_) => name.clone(),
        };
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = matches!(states.get(&key), Some(State::Done { at }) if at.elapsed() < FRESH);
        match (policy, present) {
            ("Never", Some(info)) => return Ok(Ensure::Ready { info, pulled: None }),
            ("Never", None) => {
                return Ok(Ensure::Failed {
                    reason: "ErrImageNeverPull",
                    message: format!("Container image {image:?} is not present with pull policy of Never"),
                    failure: 1,
                    at: Instant::now(),
                })
            }
            // Always: a pull at each start, unless one just finished or nothing may be asked.
            ("Always", Some(info)) if fresh || offline => {
                let pulled =
                    if fresh { self.took.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied() } else { None };
                return Ok(Ensure::Ready { info, pulled });
            }
            ("Always", _) => {}
            (_, Some(info)) => {
                let pulled =
                    if fresh { self.took.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied() } else { None };
                return Ok(Ensure::Ready { info, pulled });
            }
            (_, None) => {}
        }
        let sources = match sources {
            Ok(s) if s.is_empty() => {
                return Ok(Ensure::Failed {
                    reason: "ErrImagePull",
                    message: format!(
                        "image {image:?} is not present on node {} and cannot be pulled: the registries are offline and {} has no mirror",
                        self.node,
                        crate::agent::registries::registry_of(&name)
                    ),
                    failure: 1,
                    at: Instant::now(),
                });
            }
            Ok(s) => s,
            Err(e) => return Ok(Ensure::Failed { reason: "ErrImagePull", message: e, failure: 1, at: Instant::now() }),
        };
        match states.get(&key) {
            Some(State::Pulling) => return Ok(Ensure::Pulling { started: false }),
            Some(State::Failed { message, at, retry_at, failures, .. }) if Instant::now() < *retry_at => {
                return Ok(Ensure::Failed {
                    reason: "ImagePullBackOff",
                    message: message.clone(),
                    failure: *failures,
                    at: *at,
                });
            }
            _ => {}
        }
        let (backoff, failures) = match states.get(&key) {
            Some(State::Failed { backoff, failures, .. }) => (*backoff, *failures),
            _ => (Duration::ZERO, 0),
        };
        states.insert(key.clone(), State::Pulling);
        drop(states);
        let me = self.clone();
        let shown = image.to_string();
        tokio::spawn(async move {
            let began = Instant::now();
            let result = me.runtime.pull(&name, &sources).await;
            let mut states = me.states.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(_) => {
                    me.took.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), began.elapsed());
                    states.insert(key, State::Done { at: Instant::now() });
                }
                Err(e) => {
                    let backoff = if backoff.is_zero() { me.base } else { (backoff * 2).min(me.max) };
                    tracing::info!(image = shown, error = %e, backoff = ?backoff, "image pull failed");
                    states.insert(
                        key,
                        State::Failed {
                            message: format!("failed to pull and unpack image {shown:?}: {e}"),
                            at: Instant::now(),
                            retry_at: Instant::now() + backoff,
                            backoff,
                            failures: failures + 1,
                        },
                    );
                }
            }
        });
        Ok(Ensure::Pulling { started: true })
    }
}
