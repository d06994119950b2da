//! `tally regions sync`: reads the hosted zone and its health checks through `aws-sdk-route53`,
//! asks [`crate::plan`] what differs, and sends only that. Only this module talks to Route53.

use aws_sdk_route53::types::{
    Change as AwsChange, ChangeAction, ChangeBatch, GeoLocation, HealthCheckConfig,
    HealthCheckType, ResourceRecord, ResourceRecordSet, ResourceRecordSetFailover, RrType,
};
use aws_sdk_route53::Client;

use crate::plan::{self, Change, HealthCheck};
use crate::records::{self, Failover, Geo, Record, Routing};
use crate::topology::Topology;

/// Our health checks' caller references start with this, then the region.
const CALLER_PREFIX: &str = "tally-";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("route53: {0}")]
    Aws(String),
    #[error("route53 answered something Tally cannot read: {0}")]
    Unexpected(String),
}

fn aws(e: impl std::fmt::Display) -> SyncError {
    SyncError::Aws(e.to_string())
}

/// Where to find Route53: the usual AWS settings (environment, profile, instance role), or an
/// explicit endpoint such as a local `moto_server`. `local_credentials`: moto takes any key, so
/// a local stack needs no AWS settings at all.
pub async fn client(endpoint: Option<&str>, local_credentials: bool) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        // Route53 is global; its API lives in us-east-1.
        .region(aws_config::Region::new("us-east-1"));
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    if local_credentials {
        loader = loader.credentials_provider(aws_sdk_route53::config::Credentials::new(
            "tally-local",
            "tally-local",
            None,
            None,
            "tally-local-stack",
        ));
    }
    Client::new(&loader.load().await)
}

/// The changes `sync` made (or, with `dry_run`, would make).
pub async fn sync(
    client: &Client,
    topology: &Topology,
    dry_run: bool,
) -> Result<Vec<Change>, SyncError> {
    let zone_name = format!("{}.", topology.zone.name());
    let mut changes = Vec::new();
    let zone_id = match find_zone(client, &zone_name).await? {
        Some(id) => Some(id),
        None => {
            changes.push(Change::CreateZone {
                zone: topology.zone.name().into(),
            });
            if dry_run {
                None
            } else {
                let created = client
                    .create_hosted_zone()
                    .name(&zone_name)
                    .caller_reference(format!("{CALLER_PREFIX}zone-{}", unique()))
                    .send()
                    .await
                    .map_err(aws)?;
                Some(bare_id(
                    created
                        .hosted_zone()
                        .ok_or_else(|| SyncError::Unexpected("no hosted zone created".into()))?
                        .id(),
                ))
            }
        }
    };

    let existing_checks = list_health_checks(client).await?;
    let check_changes = plan::plan_health_checks(&plan::health_checks(topology), &existing_checks);
    let mut check_ids: Vec<(String, String)> = existing_checks
        .iter()
        .filter(|(_, c)| !c.region.is_empty())
        .map(|(id, c)| (c.region.clone(), id.clone()))
        .collect();
    for change in &check_changes {
        if dry_run {
            if let Change::CreateHealthCheck { check } = change {
                check_ids.push((check.region.clone(), format!("(new {})", check.region)));
            }
            continue;
        }
        match change {
            Change::CreateHealthCheck { check } => {
                let created = client
                    .create_health_check()
                    .caller_reference(format!("{CALLER_PREFIX}{}-{}", check.region, unique()))
                    .health_check_config(health_check_config(check)?)
                    .send()
                    .await
                    .map_err(aws)?;
                let id = created
                    .health_check()
                    .map(|h| h.id().to_string())
                    .ok_or_else(|| SyncError::Unexpected("no health check created".into()))?;
                check_ids.push((check.region.clone(), id));
            }
            Change::UpdateHealthCheck { id, check } => {
                client
                    .update_health_check()
                    .health_check_id(id)
                    .port(i32::from(check.port))
                    .resource_path(&check.path)
                    .failure_threshold(check.failure_threshold as i32)
                    .send()
                    .await
                    .map_err(aws)?;
            }
            _ => {}
        }
    }

    let desired = records::records(topology);
    let existing = match &zone_id {
        Some(id) => list_records(client, id, topology, &check_ids).await?,
        None => Vec::new(),
    };
    let record_changes = plan::plan_records(&desired, &existing);
    if !dry_run && !record_changes.is_empty() {
        let zone_id = zone_id.as_deref().expect("created above");
        let batch = record_changes
            .iter()
            .map(|c| to_aws(c, &check_ids))
            .collect::<Result<Vec<_>, _>>()?;
        client
            .change_resource_record_sets()
            .hosted_zone_id(zone_id)
            .change_batch(
                ChangeBatch::builder()
                    .comment("tally regions sync")
                    .set_changes(Some(batch))
                    .build()
                    .map_err(aws)?,
            )
            .send()
            .await
            .map_err(aws)?;
    }
    // Health checks go last: a record may point at one until the batch above moved it.
    for change in &check_changes {
        if let (false, Change::DeleteHealthCheck { id, .. }) = (dry_run, change) {
            client
                .delete_health_check()
                .health_check_id(id)
                .send()
                .await
                .map_err(aws)?;
        }
    }
    changes.extend(check_changes);
    changes.extend(record_changes);
    Ok(changes)
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}

fn bare_id(id: &str) -> String {
    id.trim_start_matches("/hostedzone/").to_string()
}

fn trim(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn find_zone(client: &Client, zone_name: &str) -> Result<Option<String>, SyncError> {
    let zones = client
        .list_hosted_zones_by_name()
        .dns_name(zone_name)
        .send()
        .await
        .map_err(aws)?;
    Ok(zones
        .hosted_zones()
        .iter()
        .find(|z| trim(z.name()) == trim(zone_name))
        .map(|z| bare_id(z.id())))
}

async fn list_health_checks(client: &Client) -> Result<Vec<(String, HealthCheck)>, SyncError> {
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = client
            .list_health_checks()
            .set_marker(marker.clone())
            .send()
            .await
            .map_err(aws)?;
        for h in page.health_checks() {
            let Some(c) = h.health_check_config() else {
                continue;
            };
            let region = h
                .caller_reference()
                .strip_prefix(CALLER_PREFIX)
                .and_then(|rest| rest.rsplit_once('-'))
                .map(|(region, _)| region.to_string())
                .unwrap_or_default();
            out.push((
                h.id().to_string(),
                HealthCheck {
                    region,
                    fqdn: c
                        .fully_qualified_domain_name()
                        .unwrap_or_default()
                        .to_string(),
                    path: c.resource_path().unwrap_or_default().to_string(),
                    port: c.port().unwrap_or(0) as u16,
                    interval_seconds: c.request_interval().unwrap_or(30) as u32,
                    failure_threshold: c.failure_threshold().unwrap_or(3) as u32,
                },
            ));
        }
        if page.is_truncated() {
            marker = page.next_marker().map(str::to_string);
        } else {
            return Ok(out);
        }
    }
}

async fn list_records(
    client: &Client,
    zone_id: &str,
    topology: &Topology,
    check_ids: &[(String, String)],
) -> Result<Vec<Record>, SyncError> {
    let mut out = Vec::new();
    let mut start: Option<(String, RrType, Option<String>)> = None;
    loop {
        let mut req = client.list_resource_record_sets().hosted_zone_id(zone_id);
        if let Some((name, kind, id)) = start.take() {
            req = req
                .start_record_name(name)
                .start_record_type(kind)
                .set_start_record_identifier(id);
        }
        let page = req.send().await.map_err(aws)?;
        for rs in page.resource_record_sets() {
            if *rs.r#type() != RrType::Cname || !plan::managed(topology, rs.name()) {
                continue;
            }
            out.push(from_aws(rs, check_ids)?);
        }
        if !page.is_truncated() {
            return Ok(out);
        }
        start = page
            .next_record_name()
            .zip(page.next_record_type())
            .map(|(n, t)| {
                (
                    n.to_string(),
                    t.clone(),
                    page.next_record_identifier().map(str::to_string),
                )
            });
        if start.is_none() {
            return Ok(out);
        }
    }
}

fn from_aws(rs: &ResourceRecordSet, check_ids: &[(String, String)]) -> Result<Record, SyncError> {
    let routing = if let Some(g) = rs.geo_location() {
        Routing::Geo(match (g.country_code(), g.continent_code()) {
            (Some("*"), _) => Geo::Default,
            (Some(c), _) => Geo::Country(c.to_string()),
            (None, Some(c)) => Geo::Continent(c.to_string()),
            _ => {
                return Err(SyncError::Unexpected(format!(
                    "geolocation of {}",
                    rs.name()
                )))
            }
        })
    } else if let Some(f) = rs.failover() {
        Routing::Failover(match f {
            ResourceRecordSetFailover::Primary => Failover::Primary,
            _ => Failover::Secondary,
        })
    } else {
        Routing::Simple
    };
    let health_check = rs
        .health_check_id()
        .map(|id| {
            check_ids
                .iter()
                .find(|(_, known)| known == id)
                .map(|(region, _)| model::RegionName::new(region.as_str()))
                // A check Tally did not make: differs from any it wants, so it gets replaced.
                .unwrap_or_else(|| model::RegionName::new("unknown"))
        })
        .transpose()
        .map_err(|e| SyncError::Unexpected(e.to_string()))?;
    Ok(Record {
        name: trim(rs.name()),
        set_identifier: rs.set_identifier().map(str::to_string),
        routing,
        health_check,
        ttl: rs.ttl().unwrap_or(0) as u32,
        value: rs
            .resource_records()
            .first()
            .map(|r| trim(r.value()))
            .unwrap_or_default(),
    })
}

fn to_aws(change: &Change, check_ids: &[(String, String)]) -> Result<AwsChange, SyncError> {
    let (action, record) = match change {
        Change::CreateRecord { record } => (ChangeAction::Create, record),
        Change::UpsertRecord { record } => (ChangeAction::Upsert, record),
        Change::DeleteRecord { record } => (ChangeAction::Delete, record),
        other => {
            return Err(SyncError::Unexpected(format!(
                "{other:?} is not a record change"
            )))
        }
    };
    let mut rs = ResourceRecordSet::builder()
        .name(format!("{}.", record.name))
        .r#type(RrType::Cname)
        .ttl(i64::from(record.ttl))
        .set_set_identifier(record.set_identifier.clone())
        .resource_records(
            ResourceRecord::builder()
                .value(format!("{}.", record.value))
                .build()
                .map_err(aws)?,
        );
    match &record.routing {
        Routing::Simple => {}
        Routing::Geo(g) => {
            let geo = match g {
                Geo::Default => GeoLocation::builder().country_code("*"),
                Geo::Country(c) => GeoLocation::builder().country_code(c),
                Geo::Continent(c) => GeoLocation::builder().continent_code(c),
            };
            rs = rs.geo_location(geo.build());
        }
        Routing::Failover(f) => {
            rs = rs.failover(match f {
                Failover::Primary => ResourceRecordSetFailover::Primary,
                Failover::Secondary => ResourceRecordSetFailover::Secondary,
            });
        }
    }
    if let Some(region) = &record.health_check {
        let id = check_ids
            .iter()
            .find(|(r, _)| r == region.as_str())
            .map(|(_, id)| id.clone())
            .ok_or_else(|| SyncError::Unexpected(format!("no health check for {region}")))?;
        rs = rs.health_check_id(id);
    }
    AwsChange::builder()
        .action(action)
        .resource_record_set(rs.build().map_err(aws)?)
        .build()
        .map_err(aws)
}

fn health_check_config(check: &HealthCheck) -> Result<HealthCheckConfig, SyncError> {
    HealthCheckConfig::builder()
        .r#type(HealthCheckType::Https)
        .fully_qualified_domain_name(&check.fqdn)
        .resource_path(&check.path)
        .port(i32::from(check.port))
        .request_interval(check.interval_seconds as i32)
        .failure_threshold(check.failure_threshold as i32)
        .build()
        .map_err(aws)
}
