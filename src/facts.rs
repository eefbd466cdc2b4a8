//! Instance facts: owns what nodeagent knows about the node it runs on, read once from IMDS at
//! boot and checked before anything is rendered from it.

use crate::imds::Imds;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// The node, as templates see it (`instance.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub local_ipv4: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub ami_id: String,
}

impl InstanceFacts {
    /// Reads every fact concurrently (IMDSv2; the session token is shared).
    pub async fn read(imds: &dyn Imds) -> anyhow::Result<InstanceFacts> {
        let (instance_id, local_ipv4, region, availability_zone, instance_type, ami_id) = tokio::try_join!(
            imds.instance_id(),
            imds.local_ipv4(),
            imds.region(),
            imds.availability_zone(),
            imds.instance_type(),
            imds.ami_id(),
        )?;
        let facts = InstanceFacts {
            instance_id,
            local_ipv4,
            region,
            availability_zone,
            instance_type,
            ami_id,
        };
        facts
            .check()
            .with_context(|| format!("instance metadata from {} is not usable", imds.endpoint()))?;
        Ok(facts)
    }

    /// The values other systems parse must have their documented shape: an address that is not
    /// an IPv4 address (the old script's "Unauthorized") must never reach a config file.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.local_ipv4.parse::<Ipv4Addr>().is_err() {
            bail!("local-ipv4 is {:?}, not an IPv4 address", self.local_ipv4);
        }
        let id = &self.instance_id;
        let id_ok = id.strip_prefix("i-").is_some_and(|hex| {
            !hex.is_empty() && hex.len() <= 32 && hex.chars().all(|c| c.is_ascii_alphanumeric())
        });
        if !id_ok {
            bail!("instance-id is {id:?}, not an EC2 instance id (i-…)");
        }
        if self.region.is_empty() {
            bail!("placement/region is empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::ImdsError;
    use async_trait::async_trait;
    use std::collections::BTreeMap;

    struct Fixed(BTreeMap<&'static str, &'static str>);

    #[async_trait]
    impl Imds for Fixed {
        async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
            let item = path.trim_start_matches("/latest/meta-data/");
            Ok(self.0.get(item).map(|v| v.to_string()))
        }
        fn endpoint(&self) -> &str {
            "fixed"
        }
    }

    fn node() -> BTreeMap<&'static str, &'static str> {
        BTreeMap::from([
            ("instance-id", "i-0123456789abcdef0"),
            ("local-ipv4", "10.0.1.7"),
            ("placement/region", "us-west-1"),
            ("placement/availability-zone", "us-west-1a"),
            ("instance-type", "m4.xlarge"),
            ("ami-id", "ami-7d664a1d"),
        ])
    }

    #[tokio::test]
    async fn reads_every_fact() {
        let facts = InstanceFacts::read(&Fixed(node())).await.unwrap();
        assert_eq!(facts.local_ipv4, "10.0.1.7");
        assert_eq!(facts.availability_zone, "us-west-1a");
    }

    #[tokio::test]
    async fn refuses_a_non_address_and_names_a_missing_item() {
        let mut items = node();
        items.insert("local-ipv4", "Unauthorized");
        let err = InstanceFacts::read(&Fixed(items)).await.unwrap_err();
        assert!(format!("{err:#}").contains("\"Unauthorized\", not an IPv4 address"));

        let mut items = node();
        items.remove("ami-id");
        let err = InstanceFacts::read(&Fixed(items)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("/latest/meta-data/ami-id"),
            "{err:#}"
        );
    }
}
