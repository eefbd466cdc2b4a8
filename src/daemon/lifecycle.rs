//! The node's standing beside the supervision: the readiness gate, self-healing, the secrets'
//! rotation, and the drain (on a trigger seen in IMDS or a request on the socket); the board
//! shows them.

use super::node::Booted;
use super::AbortOnDrop;
use crate::asg::SdkAutoScaling;
use crate::aws::AwsCalls;
use crate::consul::HttpConsul;
use crate::ecs::SdkEcs;
use crate::hostfs::RootedFs;
use crate::lifecycle::drain::{self, wait_for_trigger, DrainRequest, Notice, Trigger, Withdraw};
use crate::lifecycle::heal::SelfHeal;
use crate::lifecycle::ready::ReadinessGate;
use crate::lifecycle::rotate::Rotation;
use crate::phase::Phase;
use crate::status::{self, Board};
use crate::supervisor::Supervisor;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// What the node's standing is kept with.
pub struct Standing<'a> {
    pub booted: &'a Booted,
    pub calls: &'a Arc<AwsCalls>,
    pub supervisor: &'a Supervisor,
    pub board: &'a Board,
    pub fs: RootedFs,
}

impl Standing<'_> {
    /// Starts the gate, self-healing and the drain's trigger; `resume`: the drain an earlier
    /// agent began in this boot, which goes on at once (or, finished, is only reported). What runs ends when the returned handles are dropped.
    pub fn start(
        self,
        mut drains: tokio::sync::mpsc::Receiver<DrainRequest>,
        resume: Option<drain::DrainStatus>,
    ) -> Vec<AbortOnDrop<()>> {
        let (settings, facts, report) = (
            &self.booted.settings,
            &self.booted.facts,
            &self.booted.report,
        );
        let (sdk, calls, imds) = (&self.booted.sdk, self.calls, self.booted.imds.clone());
        let (supervisor, board, fs) = (self.supervisor, self.board, self.fs);
        let lc = &settings.lifecycle;
        let ecs = Arc::new(SdkEcs::new(sdk, calls.clone()));
        let asg = Arc::new(SdkAutoScaling::new(sdk, calls.clone()));
        let mut running = Vec::new();

        let readiness = match &report.container_instance_arn {
            Some(ci) if !lc.ready_attribute.is_empty() => {
                let (present, mut seen) = watch::channel(None);
                // A resumed drain withdraws the attribute from the start.
                let (withdraw, withdrawn) = watch::channel(resume.is_some());
                let attribute = lc.ready_attribute.clone();
                board.update(|s| {
                    s.readiness = Some(status::Readiness {
                        attribute: attribute.clone(),
                        set: None,
                    })
                });
                let gate = ReadinessGate {
                    api: ecs.clone(),
                    cluster: settings.cluster.clone(),
                    container_instance: ci.clone(),
                    attribute,
                    grace: lc.degraded_grace,
                    reassert: lc
                        .ready_attribute_at_join
                        .then_some(Duration::from_secs(300)),
                    record: Some(Arc::new(fs.clone())),
                };
                let withdraw = Withdraw {
                    withdraw,
                    present: seen.clone(),
                };
                let board = board.clone();
                running.push(AbortOnDrop(tokio::spawn(gate.run(
                    supervisor.watch(),
                    withdrawn,
                    present,
                ))));
                running.push(AbortOnDrop(tokio::spawn(async move {
                    while seen.changed().await.is_ok() {
                        let set = *seen.borrow_and_update();
                        board.update(|s| {
                            if let Some(r) = &mut s.readiness {
                                r.set = set;
                            }
                        });
                    }
                })));
                Some(withdraw)
            }
            _ => None,
        };

        if !lc.unhealthy_after.is_zero() {
            let heal = SelfHeal {
                asg: asg.clone(),
                instance_id: facts.instance_id.clone(),
                after: lc.unhealthy_after,
            };
            running.push(AbortOnDrop(tokio::spawn(heal.run(supervisor.watch()))));
        }

        if settings.secrets.values().any(|s| !s.refresh.is_zero()) {
            let (progress, mut seen) = watch::channel(Vec::new());
            let (files, mut rendered) = watch::channel(Vec::new());
            let rotation = Rotation {
                store: self.booted.secrets.clone(),
                settings: settings.clone(),
                facts: facts.clone(),
                servers: report.consul_servers.clone(),
                container_instance: report.container_instance_arn.clone(),
                fs: Arc::new(fs.clone()),
                control: supervisor.control(),
                tasks: supervisor.watch(),
                current: report.secrets.clone(),
                files,
            };
            running.push(AbortOnDrop(tokio::spawn(rotation.run(progress))));
            let board = board.clone();
            running.push(AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Ok(()) = seen.changed() => board.set_secrets(seen.borrow_and_update().clone()),
                        Ok(()) = rendered.changed() => board.set_files(&rendered.borrow_and_update()),
                        else => break,
                    }
                }
            })));
        }

        let consul: Arc<dyn crate::consul::ConsulAgent> =
            match HttpConsul::new(&settings.consul.api) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    warn!("no Consul client ({e:#}): no drain");
                    return running;
                }
            };
        let mut drain = drain::Drain {
            cluster: settings.cluster.clone(),
            container_instance: report.container_instance_arn.clone(),
            instance_id: facts.instance_id.clone(),
            started_by: crate::runtime::ecs::started_by(&facts.instance_id),
            ecs,
            consul,
            asg,
            control: supervisor.control(),
            readiness,
            // The levels in reverse; within a level, the start order (registrator before linkerd).
            stop_order: settings
                .start_levels()
                .into_iter()
                .rev()
                .flatten()
                .map(|t| t.name.to_string())
                .collect(),
            consul_task: Some(settings.consul.agent_task.clone()).filter(|t| !t.is_empty()),
            lifecycle_hook: Some(lc.lifecycle_hook.clone()).filter(|h| !h.is_empty()),
            tasks_timeout: lc.drain_tasks_timeout,
            step_timeout: lc.drain_step_timeout,
        };
        let (poll, rebalance) = (lc.trigger_poll, lc.drain_on_rebalance);
        let board = board.clone();
        running.push(AbortOnDrop(tokio::spawn(async move {
            let now = |trigger| Notice {
                trigger,
                gone_at: None,
            };
            // A drain an earlier agent finished is reported as it ended; no step runs again.
            let finished = resume.clone().filter(|d| d.done);
            let notice = match &resume {
                Some(d) if d.done => None,
                Some(d) => Some(drain::resumed_notice(&d.trigger, imds.as_ref()).await),
                None => Some(tokio::select! {
                    n = wait_for_trigger(imds.clone(), poll, rebalance) => n,
                    Some(request) = drains.recv() => {
                        if let Some(t) = request.tasks_timeout {
                            drain.tasks_timeout = t;
                        }
                        now(Trigger::Requested)
                    }
                }),
            };
            let terminated = match (&notice, &finished) {
                (Some(n), _) => n.trigger == Trigger::Terminated,
                (None, Some(d)) => d.trigger == Trigger::Terminated.name(),
                (None, None) => false,
            };
            let (progress, mut seen) = watch::channel(finished.clone());
            board.update(|s| s.drain = finished.clone());
            board.set_phase(if finished.is_some() {
                Phase::Drained
            } else {
                Phase::Draining
            });
            // Each step is recorded as it ends: the node stays drained, whatever happens to
            // this agent, and the next agent knows whether the drain finished.
            let follow = {
                let board = board.clone();
                async move {
                    while seen.changed().await.is_ok() {
                        let d = seen.borrow_and_update().clone();
                        if let Some(Err(e)) = d.as_ref().map(|d| drain::record(&fs, d)) {
                            warn!("cannot record the drain in {} ({e}): a restarted agent would not know of it", drain::RECORD);
                        }
                        board.update(|s| s.drain = d);
                    }
                }
            };
            tokio::join!(
                async {
                    if let Some(notice) = notice {
                        drain.run(notice, &progress).await;
                        board.set_phase(Phase::Drained);
                    }
                    if !terminated {
                        drain.complete_when_terminated(imds, poll, &progress).await;
                    }
                    drop(progress);
                },
                follow
            );
            // Later requests find the drain done; the socket keeps answering.
            while drains.recv().await.is_some() {}
        })));
        running
    }
}
