//! ECS boundary: owns the ECS control-plane calls nodeagent makes about its own container
//! instance — list, describe, start and stop tasks; set and remove its attributes.

use crate::aws::AwsCalls;
use async_trait::async_trait;
use aws_sdk_ecs::types::DesiredStatus;
use std::sync::Arc;

const LIST_TASKS: &str = "ecs:ListTasks";
const DESCRIBE_TASKS: &str = "ecs:DescribeTasks";
const START_TASK: &str = "ecs:StartTask";
const STOP_TASK: &str = "ecs:StopTask";
const PUT_ATTRIBUTES: &str = "ecs:PutAttributes";
const UPDATE_STATE: &str = "ecs:UpdateContainerInstancesState";
const DELETE_ATTRIBUTES: &str = "ecs:DeleteAttributes";

/// A task as ECS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcsTask {
    pub arn: String,
    /// Task-definition family, from the task-definition ARN.
    pub family: String,
    /// Task-definition revision, from the task-definition ARN.
    pub revision: Option<u32>,
    /// It was started with overrides (a command, an environment, a role…): nodeagent makes
    /// none, so such a task is not one nodeagent started.
    pub overridden: bool,
    pub started_by: Option<String>,
    pub last_status: String,
    pub desired_status: String,
    pub container_instance_arn: Option<String>,
}

/// Why ECS could not place a task (`failures[]`), e.g. reason "RESOURCE:MEMORY".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementFailure {
    pub reason: String,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    Started(EcsTask),
    NotPlaced(Vec<PlacementFailure>),
}

/// The task-definition family is not registered: retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("task definition family {family:?} is not registered in this account and region ({message}); register it (aws ecs register-task-definition) or fix the task's `family`")]
pub struct UnknownFamily {
    pub family: String,
    pub message: String,
}

#[async_trait]
pub trait Ecs: Send + Sync {
    /// ARNs of the tasks on `container_instance` whose desired status is RUNNING (all pages).
    async fn list_running_tasks(
        &self,
        cluster: &str,
        container_instance: &str,
    ) -> anyhow::Result<Vec<String>>;
    /// ARNs of the tasks on `container_instance` whose desired status is RUNNING, of `family`
    /// and started by `started_by` (a `StartTask` whose answer was lost is found again so).
    async fn running_tasks_of(
        &self,
        cluster: &str,
        container_instance: &str,
        family: &str,
        started_by: &str,
    ) -> anyhow::Result<Vec<String>>;
    async fn describe_tasks(&self, cluster: &str, arns: &[String]) -> anyhow::Result<Vec<EcsTask>>;
    /// `StopTask`; a task ECS no longer knows is not an error.
    async fn stop_task(&self, cluster: &str, arn: &str, reason: &str) -> anyhow::Result<()>;
    /// `StartTask` of the latest revision of `family` on `container_instance`.
    async fn start_task(
        &self,
        cluster: &str,
        family: &str,
        container_instance: &str,
        started_by: &str,
    ) -> anyhow::Result<StartOutcome>;
}

/// What nodeagent says and asks about its own container instance (readiness, drain).
#[async_trait]
pub trait ContainerInstance: Send + Sync {
    /// `UpdateContainerInstancesState DRAINING`: ECS moves service tasks elsewhere and places
    /// nothing new here.
    async fn set_draining(&self, cluster: &str, container_instance: &str) -> anyhow::Result<()>;
    /// The tasks on `container_instance` that are not `STOPPED` yet, whatever their desired
    /// status (a task told to stop is still there until it has).
    async fn tasks_not_stopped(
        &self,
        cluster: &str,
        container_instance: &str,
    ) -> anyhow::Result<Vec<EcsTask>>;
    /// `PutAttributes`: the attribute `name=value` on `container_instance` (its full ARN).
    async fn put_attribute(
        &self,
        cluster: &str,
        container_instance: &str,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()>;
    /// `DeleteAttributes`: removes attribute `name` (set to `value`) from `container_instance`;
    /// an attribute that is not there is not an error.
    async fn delete_attribute(
        &self,
        cluster: &str,
        container_instance: &str,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()>;
}

pub struct SdkEcs {
    client: aws_sdk_ecs::Client,
    calls: Arc<AwsCalls>,
}

impl SdkEcs {
    pub fn new(config: &aws_config::SdkConfig, calls: Arc<AwsCalls>) -> Self {
        SdkEcs {
            client: aws_sdk_ecs::Client::new(config),
            calls,
        }
    }
}

fn task_from(t: &aws_sdk_ecs::types::Task) -> EcsTask {
    let name_rev = t
        .task_definition_arn()
        .and_then(|arn| arn.rsplit('/').next())
        .unwrap_or_default();
    let (family, revision) = match name_rev.split_once(':') {
        Some((f, r)) => (f.to_string(), r.parse().ok()),
        None => (name_rev.to_string(), None),
    };
    let overridden = t.overrides().is_some_and(|o| {
        o.task_role_arn().is_some()
            || o.execution_role_arn().is_some()
            || o.container_overrides().iter().any(|c| {
                !c.command().is_empty()
                    || !c.environment().is_empty()
                    || !c.environment_files().is_empty()
            })
    });
    EcsTask {
        arn: t.task_arn().unwrap_or_default().to_string(),
        family,
        revision,
        overridden,
        started_by: t.started_by().map(str::to_string),
        last_status: t.last_status().unwrap_or_default().to_string(),
        desired_status: t.desired_status().unwrap_or_default().to_string(),
        container_instance_arn: t.container_instance_arn().map(str::to_string),
    }
}

impl SdkEcs {
    /// Task ARNs on `container_instance` with `desired` status, all pages; `of`: only those of
    /// (family, startedBy).
    async fn list_tasks(
        &self,
        cluster: &str,
        container_instance: &str,
        desired: DesiredStatus,
        of: Option<(&str, &str)>,
    ) -> anyhow::Result<Vec<String>> {
        let mut pages = self
            .client
            .list_tasks()
            .cluster(cluster)
            .container_instance(container_instance)
            // Always explicit: some implementations default to every status.
            .desired_status(desired)
            .set_family(of.map(|(family, _)| family.to_string()))
            .set_started_by(of.map(|(_, by)| by.to_string()))
            .into_paginator()
            .send();
        let mut arns = Vec::new();
        while let Some(page) = pages.next().await {
            let page = self.calls.record(
                LIST_TASKS,
                || format!("on cluster {cluster} for {container_instance}"),
                page,
            )?;
            arns.extend(page.task_arns().iter().cloned());
        }
        Ok(arns)
    }
}

#[async_trait]
impl Ecs for SdkEcs {
    async fn list_running_tasks(
        &self,
        cluster: &str,
        container_instance: &str,
    ) -> anyhow::Result<Vec<String>> {
        self.list_tasks(cluster, container_instance, DesiredStatus::Running, None)
            .await
    }

    async fn running_tasks_of(
        &self,
        cluster: &str,
        container_instance: &str,
        family: &str,
        started_by: &str,
    ) -> anyhow::Result<Vec<String>> {
        let of = Some((family, started_by));
        self.list_tasks(cluster, container_instance, DesiredStatus::Running, of)
            .await
    }

    async fn describe_tasks(&self, cluster: &str, arns: &[String]) -> anyhow::Result<Vec<EcsTask>> {
        let mut tasks = Vec::new();
        for chunk in arns.chunks(100) {
            let out = self
                .client
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .send()
                .await;
            let out = self
                .calls
                .record(DESCRIBE_TASKS, || format!("on cluster {cluster}"), out)?;
            tasks.extend(out.tasks().iter().map(task_from));
        }
        Ok(tasks)
    }

    async fn stop_task(&self, cluster: &str, arn: &str, reason: &str) -> anyhow::Result<()> {
        let out = self
            .client
            .stop_task()
            .cluster(cluster)
            .task(arn)
            .reason(reason)
            .send()
            .await;
        match self
            .calls
            .record(STOP_TASK, || format!("of {arn} on cluster {cluster}"), out)
        {
            Ok(_) => Ok(()),
            // A task ECS no longer knows.
            Err(e) if e.code.as_deref() == Some("InvalidParameterException") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn start_task(
        &self,
        cluster: &str,
        family: &str,
        container_instance: &str,
        started_by: &str,
    ) -> anyhow::Result<StartOutcome> {
        let out = self
            .client
            .start_task()
            .cluster(cluster)
            .task_definition(family)
            .container_instances(container_instance)
            .started_by(started_by)
            .send()
            .await;
        let out = match self.calls.record(
            START_TASK,
            || format!("of family {family:?} on cluster {cluster}"),
            out,
        ) {
            Ok(out) => out,
            Err(e)
                if e.code.as_deref() == Some("ClientException")
                    && e.message.to_ascii_lowercase().contains("task definition") =>
            {
                return Err(UnknownFamily {
                    family: family.to_string(),
                    message: e.message,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(task) = out.tasks().first() {
            return Ok(StartOutcome::Started(task_from(task)));
        }
        Ok(StartOutcome::NotPlaced(
            out.failures()
                .iter()
                .map(|f| PlacementFailure {
                    reason: f.reason().unwrap_or("unknown").to_string(),
                    detail: f.detail().map(str::to_string),
                })
                .collect(),
        ))
    }
}

#[async_trait]
impl ContainerInstance for SdkEcs {
    async fn set_draining(&self, cluster: &str, container_instance: &str) -> anyhow::Result<()> {
        let out = self
            .client
            .update_container_instances_state()
            .cluster(cluster)
            .container_instances(container_instance)
            .status(aws_sdk_ecs::types::ContainerInstanceStatus::Draining)
            .send()
            .await;
        let out = self.calls.record(
            UPDATE_STATE,
            || format!("DRAINING of {container_instance}"),
            out,
        )?;
        if let Some(f) = out.failures().first() {
            anyhow::bail!(
                "{UPDATE_STATE} DRAINING of {container_instance}: {} {}",
                f.reason().unwrap_or_default(),
                f.detail().unwrap_or_default()
            );
        }
        Ok(())
    }

    async fn tasks_not_stopped(
        &self,
        cluster: &str,
        container_instance: &str,
    ) -> anyhow::Result<Vec<EcsTask>> {
        let mut arns = self
            .list_tasks(cluster, container_instance, DesiredStatus::Running, None)
            .await?;
        arns.extend(
            self.list_tasks(cluster, container_instance, DesiredStatus::Stopped, None)
                .await?,
        );
        arns.sort();
        arns.dedup();
        if arns.is_empty() {
            return Ok(Vec::new());
        }
        let tasks = self.describe_tasks(cluster, &arns).await?;
        Ok(tasks
            .into_iter()
            .filter(|t| t.last_status != "STOPPED")
            .collect())
    }

    async fn put_attribute(
        &self,
        cluster: &str,
        container_instance: &str,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        self.attribute(true, cluster, container_instance, name, value)
            .await
    }

    async fn delete_attribute(
        &self,
        cluster: &str,
        container_instance: &str,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        self.attribute(false, cluster, container_instance, name, value)
            .await
    }
}

impl SdkEcs {
    /// `PutAttributes` (`put`) or `DeleteAttributes` of `name=value` on `container_instance`;
    /// deleting an attribute that is not there is not an error.
    async fn attribute(
        &self,
        put: bool,
        cluster: &str,
        container_instance: &str,
        name: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        // ECS deletes by name; the value is given too, as emulators match on it.
        let attribute = attribute(container_instance, name, value)?;
        let what = || format!("{name} on {container_instance}");
        let out = if put {
            let out = self
                .client
                .put_attributes()
                .cluster(cluster)
                .attributes(attribute)
                .send()
                .await;
            self.calls.record(PUT_ATTRIBUTES, what, out).map(|_| ())
        } else {
            let out = self
                .client
                .delete_attributes()
                .cluster(cluster)
                .attributes(attribute)
                .send()
                .await;
            self.calls.record(DELETE_ATTRIBUTES, what, out).map(|_| ())
        };
        match out {
            Ok(()) => Ok(()),
            // Deleting what is not there.
            Err(e) if !put && e.code.as_deref() == Some("TargetNotFoundException") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The attribute `name=value` on a container instance given by its full ARN (which needs no
/// `targetType`).
fn attribute(
    container_instance: &str,
    name: &str,
    value: &str,
) -> anyhow::Result<aws_sdk_ecs::types::Attribute> {
    Ok(aws_sdk_ecs::types::Attribute::builder()
        .name(name)
        .value(value)
        .target_id(container_instance)
        .build()?)
}
