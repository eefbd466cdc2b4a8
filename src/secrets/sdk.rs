//! The [`SecretStore`] of a real node: SSM Parameter Store and Secrets Manager through the AWS
//! SDK, every call counted and classified ([`AwsCalls`]), the SDK's own retries off
//! ([`crate::aws::sdk_config`]). A refused decrypt names `kms:Decrypt`; no error carries a
//! value.

use super::{Fetched, SecretStore, SecretValue, SSM_BATCH};
use crate::aws::{AwsCalls, AwsError};
use anyhow::{anyhow, bail};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

const GET_PARAMETERS: &str = "ssm:GetParameters";
const GET_SECRET_VALUE: &str = "secretsmanager:GetSecretValue";

pub struct SdkSecrets {
    ssm: aws_sdk_ssm::Client,
    secretsmanager: aws_sdk_secretsmanager::Client,
    calls: Arc<AwsCalls>,
}

impl SdkSecrets {
    pub fn new(config: &aws_config::SdkConfig, calls: Arc<AwsCalls>) -> Self {
        SdkSecrets {
            ssm: aws_sdk_ssm::Client::new(config),
            secretsmanager: aws_sdk_secretsmanager::Client::new(config),
            calls,
        }
    }
}

/// A failed call as an error that says what to do: a refused decrypt needs `kms:Decrypt` on
/// the key.
fn explain(e: AwsError) -> anyhow::Error {
    let kms = e.code.as_deref() == Some("DecryptionFailure")
        || e.message.contains("kms:")
        || e.message.contains("KMS");
    if kms {
        let op = e.op;
        anyhow::Error::new(e).context(format!(
            "{op} could not decrypt: the instance role needs kms:Decrypt on the KMS key that encrypts it"
        ))
    } else {
        e.into()
    }
}

#[async_trait]
impl SecretStore for SdkSecrets {
    async fn parameters(&self, names: &[String]) -> anyhow::Result<BTreeMap<String, Fetched>> {
        if names.len() > SSM_BATCH {
            bail!("at most {SSM_BATCH} parameters a call");
        }
        self.calls.pace().await;
        let answer = self
            .ssm
            .get_parameters()
            .set_names(Some(names.to_vec()))
            .with_decryption(true)
            .send()
            .await;
        let out = self
            .calls
            .record(GET_PARAMETERS, || names.join(", "), answer)
            .map_err(explain)?;
        let mut got = BTreeMap::new();
        for p in out.parameters.unwrap_or_default() {
            let (Some(name), Some(value)) = (p.name, p.value) else {
                continue;
            };
            let version = format!("v{}", p.version);
            got.insert(
                name,
                Fetched {
                    value: SecretValue::new(value),
                    version,
                },
            );
        }
        Ok(got)
    }

    async fn secret_value(&self, id: &str) -> anyhow::Result<Fetched> {
        self.calls.pace().await;
        let answer = self
            .secretsmanager
            .get_secret_value()
            .secret_id(id)
            .send()
            .await;
        let out = self
            .calls
            .record(GET_SECRET_VALUE, || id.to_string(), answer)
            .map_err(explain)?;
        let version = out
            .version_id
            .as_deref()
            .map(|v| v.chars().take(8).collect())
            .unwrap_or_else(|| "?".into());
        match (out.secret_string, out.secret_binary) {
            (Some(text), _) => Ok(Fetched {
                value: SecretValue::new(text),
                version,
            }),
            (None, Some(binary)) => {
                drop(Zeroizing::new(binary.into_inner()));
                Err(anyhow!(
                    "secret {id} is binary (SecretBinary): store it as a string (SecretString)"
                ))
            }
            (None, None) => Err(anyhow!("secret {id} has no value")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::FailureKind;

    #[test]
    fn a_refused_decrypt_says_kms_decrypt_and_other_refusals_name_the_call() {
        let denied = |message: &str| AwsError {
            op: GET_PARAMETERS,
            kind: FailureKind::Refused,
            code: Some("AccessDeniedException".into()),
            what: "/prod/consul/gossip-key".into(),
            message: message.into(),
        };
        let kms = format!(
            "{:#}",
            explain(denied("not authorized to perform: kms:Decrypt"))
        );
        assert!(kms.contains("needs kms:Decrypt on the KMS key"), "{kms}");
        assert!(kms.contains("/prod/consul/gossip-key"), "{kms}");
        let other = format!("{:#}", explain(denied("not authorized")));
        assert!(
            other.contains("the instance role needs ssm:GetParameters"),
            "{other}"
        );
    }
}
