//! The in-memory runtime and prober the supervision tests drive.

use super::super::health::{Probe, Prober};
use crate::runtime::{Exit, Instance, Runtime, RuntimeEvent};
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Tasks as an engine would run them, in memory; every call recorded with its time.
#[derive(Default)]
pub struct Fake {
    state: Mutex<FakeState>,
}

#[derive(Default)]
pub struct FakeState {
    pub next: u32,
    pub instances: Vec<Instance>,
    /// (when, task) of every start.
    pub starts: Vec<(Instant, String)>,
    /// Ids asked to stop, in order.
    pub stops: Vec<String>,
    /// Starts of this task fail this many more times.
    pub failing_starts: BTreeMap<String, u32>,
    /// Listings fail this many more times (an engine or AWS that does not answer yet).
    pub failing_lists: u32,
    /// (when, succeeded) of every listing.
    pub lists: Vec<(Instant, bool)>,
    /// Stops of these instances never return.
    pub hanging_stops: BTreeSet<String>,
    /// A start of this task reports its instance dead before it returns.
    pub dies_at_start: BTreeSet<String>,
    pub subscribers: Vec<mpsc::UnboundedSender<anyhow::Result<RuntimeEvent>>>,
}

impl Fake {
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// An instance that runs already (left by an earlier agent).
    pub fn running(&self, task: &str, id: &str) {
        self.with(|s| {
            s.instances.push(Instance {
                task: task.into(),
                id: id.into(),
                running: true,
                exit: None,
            })
        });
    }

    /// The running instance of `task` dies with `code`; the event is sent.
    pub fn kill(&self, task: &str, code: i64) -> String {
        self.with(|s| {
            let inst = s
                .instances
                .iter_mut()
                .find(|i| i.task == task && i.running)
                .unwrap_or_else(|| panic!("no running {task}"));
            inst.running = false;
            let exit = Exit {
                code: Some(code),
                reason: "died".into(),
            };
            inst.exit = Some(exit.clone());
            let id = inst.id.clone();
            s.send(RuntimeEvent::Exited {
                id: id.clone(),
                exit,
            });
            id
        })
    }

    pub fn starts_of(&self, task: &str) -> Vec<Instant> {
        self.with(|s| {
            s.starts
                .iter()
                .filter(|(_, t)| t == task)
                .map(|(at, _)| *at)
                .collect()
        })
    }

    pub fn running_ids(&self, task: &str) -> Vec<String> {
        self.with(|s| {
            s.instances
                .iter()
                .filter(|i| i.task == task && i.running)
                .map(|i| i.id.clone())
                .collect()
        })
    }
}

impl FakeState {
    fn send(&mut self, event: RuntimeEvent) {
        self.subscribers
            .retain(|tx| tx.send(Ok(event.clone())).is_ok());
    }
}

#[async_trait]
impl Runtime for Fake {
    async fn instances(&self) -> anyhow::Result<Vec<Instance>> {
        self.with(|s| {
            let fails = s.failing_lists > 0;
            s.lists.push((Instant::now(), !fails));
            if fails {
                s.failing_lists -= 1;
                anyhow::bail!("ThrottlingException: Rate exceeded");
            }
            Ok(s.instances.clone())
        })
    }

    async fn start(&self, task: &str) -> anyhow::Result<Instance> {
        let (instance, dies) = self.with(|s| {
            s.starts.push((Instant::now(), task.to_string()));
            if let Some(n) = s.failing_starts.get_mut(task).filter(|n| **n > 0) {
                *n -= 1;
                anyhow::bail!("no room for {task}");
            }
            s.next += 1;
            let instance = Instance {
                task: task.into(),
                id: format!("{task}-{}", s.next),
                running: true,
                exit: None,
            };
            s.instances.push(instance.clone());
            let dies = s.dies_at_start.remove(task);
            Ok((instance, dies))
        })?;
        if dies {
            // It dies at once: the event comes before the start reports.
            self.kill(task, 7);
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(Instance {
                running: true,
                exit: None,
                ..instance
            });
        }
        Ok(instance)
    }

    async fn stop(&self, instance: &Instance) -> anyhow::Result<()> {
        let hangs = self.with(|s| {
            s.stops.push(instance.id.clone());
            s.hanging_stops.contains(&instance.id)
        });
        if hangs {
            std::future::pending::<()>().await;
        }
        self.with(|s| s.instances.retain(|i| i.id != instance.id));
        Ok(())
    }

    async fn output_tail(&self, instance: &Instance, _lines: usize) -> anyhow::Result<String> {
        Ok(format!("the last words of {}\n", instance.id))
    }

    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<RuntimeEvent>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with(|s| s.subscribers.push(tx));
        Ok(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|e| (e, rx))
        })))
    }
}

/// Health, as the test says: every task healthy unless told otherwise.
#[derive(Default)]
pub struct Health(Mutex<BTreeSet<String>>);

impl Health {
    pub fn set(&self, task: &str, healthy: bool) {
        let mut sick = self.0.lock().unwrap();
        if healthy {
            sick.remove(task);
        } else {
            sick.insert(task.into());
        }
    }
}

#[async_trait]
impl Prober for Health {
    async fn check(&self, task: &str, _: &Probe, _: Duration) -> Result<(), String> {
        match self.0.lock().unwrap().contains(task) {
            true => Err(format!("{task} is sick")),
            false => Ok(()),
        }
    }
}
