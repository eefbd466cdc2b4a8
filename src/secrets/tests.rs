//! The secret reads against an in-memory store: batching, JSON fields, errors that name the
//! source and never the value, the boot's wait.

use super::*;
use std::sync::Mutex;

/// Parameters and Secrets Manager secrets in memory; every call recorded.
#[derive(Default)]
pub struct Fake {
    pub params: Mutex<BTreeMap<String, (String, i64)>>,
    pub secrets: Mutex<BTreeMap<String, (String, String)>>,
    pub calls: Mutex<Vec<String>>,
}

#[async_trait]
impl SecretStore for Fake {
    async fn parameters(&self, names: &[String]) -> anyhow::Result<BTreeMap<String, Fetched>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("GetParameters {}", names.join(",")));
        let params = self.params.lock().unwrap();
        Ok(names
            .iter()
            .filter_map(|n| {
                params.get(n).map(|(v, ver)| {
                    (
                        n.clone(),
                        Fetched {
                            value: SecretValue::new(v.clone()),
                            version: format!("v{ver}"),
                        },
                    )
                })
            })
            .collect())
    }

    async fn secret_value(&self, id: &str) -> anyhow::Result<Fetched> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("GetSecretValue {id}"));
        let secrets = self.secrets.lock().unwrap();
        let (value, version) = secrets
            .get(id)
            .ok_or_else(|| anyhow!("ResourceNotFoundException: can't find the specified secret"))?;
        Ok(Fetched {
            value: SecretValue::new(value.clone()),
            version: version.clone(),
        })
    }
}

fn ssm(name: &str) -> SecretSource {
    SecretSource::Ssm { name: name.into() }
}

fn sm(id: &str, key: Option<&str>) -> SecretSource {
    SecretSource::SecretsManager {
        id: id.into(),
        key: key.map(str::to_string),
    }
}

#[tokio::test]
async fn one_call_per_ten_parameters_and_per_secret() {
    let fake = Fake::default();
    let mut wanted = Vec::new();
    for i in 0..12 {
        fake.params
            .lock()
            .unwrap()
            .insert(format!("/p/{i:02}"), (format!("value-{i}"), 3));
        wanted.push((format!("p{i:02}"), ssm(&format!("/p/{i:02}"))));
    }
    fake.secrets.lock().unwrap().insert(
        "prod/agent".into(),
        (r#"{"token":"tok-1","port":8501}"#.into(), "abcd1234".into()),
    );
    wanted.push(("token".into(), sm("prod/agent", Some("token"))));
    wanted.push(("port".into(), sm("prod/agent", Some("port"))));
    let got = fetch_once(&fake, &wanted).await;
    assert_eq!(got.len(), 14);
    assert_eq!(got["p11"].as_ref().unwrap().value.expose(), "value-11");
    assert_eq!(got["p11"].as_ref().unwrap().version, "v3");
    assert_eq!(got["token"].as_ref().unwrap().value.expose(), "tok-1");
    assert_eq!(got["port"].as_ref().unwrap().value.expose(), "8501");
    let calls = fake.calls.lock().unwrap();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("GetParameters"))
            .count(),
        2
    );
}

#[tokio::test]
async fn errors_name_the_secret_and_source_never_the_value() {
    let fake = Fake::default();
    fake.secrets.lock().unwrap().insert(
        "prod/agent".into(),
        (r#"{"other":"hunter2-secret"}"#.into(), "v".into()),
    );
    fake.secrets
        .lock()
        .unwrap()
        .insert("plain".into(), ("hunter3-secret".into(), "v".into()));
    let wanted = vec![
        ("gossip".into(), ssm("/prod/gossip")),
        ("token".into(), sm("prod/agent", Some("token"))),
        ("plain".into(), sm("plain", Some("token"))),
        ("gone".into(), sm("missing", None)),
    ];
    let got = fetch_once(&fake, &wanted).await;
    let err = |n: &str| format!("{:#}", got[n].as_ref().unwrap_err());
    assert!(err("gossip").contains("secret gossip (ssm:/prod/gossip): no such parameter"));
    assert!(err("token").contains(
        "secret token (secretsmanager:prod/agent#token): the JSON secret has no field \"token\""
    ));
    assert!(
        err("plain").contains("is not a JSON object"),
        "{}",
        err("plain")
    );
    assert!(err("gone").contains("reading secret gone (secretsmanager:missing)"));
    for n in ["gossip", "token", "plain", "gone"] {
        assert!(!err(n).contains("hunter"), "{}", err(n));
    }
    assert_eq!(
        format!("{:?}", SecretValue::new("hunter4".into())),
        "SecretValue(<redacted>)"
    );
}

#[tokio::test(start_paused = true)]
async fn the_boot_waits_for_a_missing_parameter_then_names_it() {
    let fake = Arc::new(Fake::default());
    let wanted = vec![("gossip".to_string(), ssm("/prod/gossip"))];
    let waits = Mutex::new(0);
    let waiting = |w: Option<Duration>| {
        if w.is_some() {
            *waits.lock().unwrap() += 1;
        }
    };
    let start = Instant::now();
    let err = fetch_until(
        fake.as_ref(),
        &wanted,
        start + Duration::from_secs(60),
        &waiting,
    )
    .await
    .unwrap_err();
    assert!(Instant::now() - start >= Duration::from_secs(60));
    let err = format!("{err:#}");
    assert!(
        err.contains("secret gossip (ssm:/prod/gossip): no such parameter"),
        "{err}"
    );
    assert!(*waits.lock().unwrap() >= 5, "retried");

    // Created while the boot waits: found.
    let later = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        later
            .params
            .lock()
            .unwrap()
            .insert("/prod/gossip".into(), ("k".into(), 1));
    });
    let got = fetch_until(
        fake.as_ref(),
        &wanted,
        Instant::now() + Duration::from_secs(60),
        &waiting,
    )
    .await
    .unwrap();
    assert_eq!(got.0["gossip"].fetched.value.expose(), "k");
}

use std::sync::Arc;

/// Watches memory as it is freed: a block that still holds [`MARKER`] when freed was not
/// zeroed. (The lib's tests run under it; only the test below writes the marker.)
mod freed {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub const MARKER: &str = "zz-secret-marker-5f0c9b1e7d2a4c3b";
    pub static HOLDING: AtomicUsize = AtomicUsize::new(0);

    pub struct Watch;

    // SAFETY: every call is System's; `dealloc` only reads the block it is given, before
    // System frees it.
    unsafe impl GlobalAlloc for Watch {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let marker = MARKER.as_bytes();
            if (marker.len()..=1 << 16).contains(&layout.size()) {
                // SAFETY: the block is `layout.size()` bytes, still allocated.
                let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
                if block.windows(marker.len()).any(|w| w == marker) {
                    HOLDING.fetch_add(1, Ordering::SeqCst);
                }
            }
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static WATCH: Watch = Watch;
}

/// A store that makes each value in place (no copy of it kept anywhere else).
struct Minted;

#[async_trait]
impl SecretStore for Minted {
    async fn parameters(&self, names: &[String]) -> anyhow::Result<BTreeMap<String, Fetched>> {
        Ok(names
            .iter()
            .map(|n| {
                let value = SecretValue::new(String::from(freed::MARKER));
                let version = "v1".to_string();
                (n.clone(), Fetched { value, version })
            })
            .collect())
    }

    async fn secret_value(&self, _id: &str) -> anyhow::Result<Fetched> {
        let mut doc = String::with_capacity(200);
        for part in [
            "{\"token\": \"",
            freed::MARKER,
            "\", \"other\": \"",
            freed::MARKER,
        ] {
            doc.push_str(part);
        }
        doc.push_str("\"}");
        Ok(Fetched {
            value: SecretValue::new(doc),
            version: "1f612f36".into(),
        })
    }
}

#[tokio::test]
async fn the_memory_that_held_a_secret_is_zeroed_when_freed() {
    use std::sync::atomic::Ordering;
    let before = freed::HOLDING.load(Ordering::SeqCst);
    let wanted = vec![
        ("gossip".to_string(), ssm("/prod/consul/gossip-key")),
        ("token".to_string(), sm("prod/consul/agent", Some("token"))),
        ("whole".to_string(), sm("prod/consul/agent", None)),
    ];
    let read = fetch_until(&Minted, &wanted, Instant::now(), &|_| {})
        .await
        .unwrap();
    assert_eq!(read.values()["token"], freed::MARKER, "a JSON field");
    assert!(read.values()["whole"].contains(freed::MARKER));
    let copy = read.clone();
    let status = format!("{:?}", copy.0["gossip"]);
    assert!(!status.contains(freed::MARKER), "{status}");
    drop(copy);
    drop(read);
    let mut rendered = String::from("{\"encrypt\": \"");
    rendered.push_str(freed::MARKER);
    let file = crate::render::RenderedFile {
        task: "consul-agent".into(),
        path: "/opt/consul/config/consul-agent.json".into(),
        mode: 0o640,
        owner: None,
        contents: Zeroizing::new(rendered),
        sha256: String::new(),
        secrets: vec!["gossip".into()],
    };
    drop(file.clone());
    drop(file);
    assert_eq!(
        freed::HOLDING.load(Ordering::SeqCst),
        before,
        "memory freed with a secret still in it"
    );
    // The watch sees a value that is not zeroed.
    drop(String::from(freed::MARKER));
    assert!(freed::HOLDING.load(Ordering::SeqCst) > before);
}
