//! The reconcile: compares what the runtime has with what should run — adopts running
//! instances of our tasks, notices the dead no event told of, stops duplicates and instances
//! of tasks no longer configured. At the loop's start (adoption after a restart of nodeagent)
//! and every `reconcile_interval` (the backstop for missed events and an engine that was
//! away). Listing is the one call made in the loop itself; every stop is a job.

use super::{Job, State, Supervisor};
use crate::runtime::{Exit, Instance};
use std::collections::BTreeMap;
use tokio::task::JoinSet;
use tracing::{info, warn};

impl Supervisor {
    /// Does nothing more when the runtime cannot be listed.
    pub(super) async fn reconcile(&mut self, jobs: &mut JoinSet<Job>) {
        let instances = match self.runtime.instances().await {
            Ok(list) => list,
            Err(e) => {
                if self.listed {
                    warn!("cannot list the tasks' instances ({e:#}); will retry");
                } else {
                    warn!("cannot list the tasks' instances ({e:#}): nothing starts until they are listed (what runs already is adopted, not started again); retrying");
                }
                return;
            }
        };
        self.listed = true;
        let mut seen: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for inst in instances {
            seen.entry(inst.task.clone()).or_default().push(inst);
        }
        for i in 0..self.slots.len() {
            let policy = self.policy.clone();
            let slot = &mut self.slots[i];
            if slot.state == State::CrashLoop
                && slot.instance.is_some()
                && slot.healthy_since.is_some()
            {
                // Out of the crash loop once its restarts have aged out of the window.
                let state = slot.up_state(&policy, State::Healthy);
                slot.set_state(state);
            }
            let name = slot.spec.name.clone();
            let mine = seen.remove(&name).unwrap_or_default();
            if slot.busy {
                continue; // a start is in flight: what it creates is not a stranger
            }
            let current = slot.instance.as_ref().map(|x| x.id.clone());
            // The current instance vanished or stopped without an event.
            if let Some(id) = &current {
                match mine.iter().find(|x| &x.id == id) {
                    Some(x) if x.running => {}
                    Some(x) => {
                        let exit = x.exit.clone().unwrap_or(Exit {
                            code: None,
                            reason: "exited".into(),
                        });
                        self.on_exited(id, exit, false, jobs);
                    }
                    None => {
                        let exit = Exit {
                            code: None,
                            reason: "gone".into(),
                        };
                        self.on_exited(id, exit, false, jobs)
                    }
                }
            }
            for inst in mine {
                let slot = &mut self.slots[i];
                if Some(&inst.id) == current.as_ref()
                    || slot.dead.as_ref().is_some_and(|d| d.id == inst.id)
                {
                    continue;
                }
                if inst.running && slot.instance.is_none() && slot.dead.is_none() && !slot.held {
                    info!(task = %name, id = %inst.id, "{name}: adopted running instance");
                    self.adopt(i, inst);
                    self.slots[i].adopted = true;
                } else {
                    if inst.running && !self.stopping.contains(&inst.id) {
                        warn!(task = %name, id = %inst.id, "{name}: stopping a duplicate instance");
                    }
                    self.stop_in_job(Some(i), inst, jobs);
                }
            }
        }
        for (task, strays) in seen {
            for inst in strays {
                if !self.stopping.contains(&inst.id) {
                    warn!(task = %task, id = %inst.id, "{task}: stopping and removing an instance of a task that is not in the configuration");
                }
                self.stop_in_job(None, inst, jobs);
            }
        }
    }
}
