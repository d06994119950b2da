# Route53: voters are sent to the region serving their continent (geolocation, with a default),
# and each region's name is a failover pair (PRIMARY: the region, with its health check;
# SECONDARY: the region it fails over to). `tally regions sync` keeps the same records from
# the topology files; this module creates them where Terraform owns the zone.

variable "domain" {
  type = string
  validation {
    condition     = can(regex("^[a-z0-9-]+(\\.[a-z0-9-]+)+$", var.domain))
    error_message = "The domain is a DNS name such as tally.vote."
  }
}

variable "regions" {
  description = "Per region: its load balancer, the continents it serves, and the region it fails over to."
  type = map(object({
    alb_dns_name = string
    alb_zone_id  = string
    continents   = list(string)
    failover_to  = string
  }))
  validation {
    condition     = alltrue([for r in values(var.regions) : length(r.continents) > 0])
    error_message = "Every region serves at least one continent."
  }
  validation {
    condition     = length(flatten([for r in values(var.regions) : r.continents])) == length(distinct(flatten([for r in values(var.regions) : r.continents])))
    error_message = "A continent is served by exactly one region."
  }
  validation {
    condition     = alltrue([for k, r in var.regions : r.failover_to != k && contains(keys(var.regions), r.failover_to)])
    error_message = "Each region fails over to another region of the map."
  }
}

variable "default_region" {
  type = string
}

variable "logs_kms_key_arn" {
  description = "Encrypts the query log (a us-east-1 key that CloudWatch Logs may use)."
  type        = string
}

resource "aws_route53_zone" "this" {
  name = var.domain
}

data "aws_caller_identity" "this" {}

# DNSSEC: Route53 signs the zone with a key-signing key held in KMS (us-east-1, as Route53 requires).
resource "aws_kms_key" "dnssec" {
  customer_master_key_spec = "ECC_NIST_P256"
  key_usage                = "SIGN_VERIFY"
  deletion_window_in_days  = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.this.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "Route53Signs"
        Effect    = "Allow"
        Principal = { Service = "dnssec-route53.amazonaws.com" }
        Action    = ["kms:DescribeKey", "kms:GetPublicKey", "kms:Sign"]
        Resource  = "*"
      },
    ]
  })
}

resource "aws_route53_key_signing_key" "this" {
  hosted_zone_id             = aws_route53_zone.this.id
  key_management_service_arn = aws_kms_key.dnssec.arn
  name                       = "tally"
}

resource "aws_route53_hosted_zone_dnssec" "this" {
  hosted_zone_id = aws_route53_key_signing_key.this.hosted_zone_id
}

resource "aws_cloudwatch_log_group" "queries" {
  name              = "/aws/route53/${var.domain}"
  retention_in_days = 365
  kms_key_id        = var.logs_kms_key_arn
}

resource "aws_cloudwatch_log_resource_policy" "queries" {
  policy_name = "tally-route53-queries"
  policy_document = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "route53.amazonaws.com" }
      Action    = ["logs:CreateLogStream", "logs:PutLogEvents"]
      Resource  = "${aws_cloudwatch_log_group.queries.arn}:*"
    }]
  })
}

resource "aws_route53_query_log" "this" {
  depends_on               = [aws_cloudwatch_log_resource_policy.queries]
  zone_id                  = aws_route53_zone.this.zone_id
  cloudwatch_log_group_arn = aws_cloudwatch_log_group.queries.arn
}

# The health check asks the load balancer by its own name; the Ingress's rule without a host
# sends /readyz to ingest, so a region is healthy when its ingest is ready.
resource "aws_route53_health_check" "region" {
  for_each          = var.regions
  fqdn              = each.value.alb_dns_name
  port              = 443
  type              = "HTTPS"
  resource_path     = "/readyz"
  request_interval  = 10
  failure_threshold = 3
  tags              = { Name = "tally-${each.key}" }
}

resource "aws_route53_record" "primary" {
  for_each        = var.regions
  zone_id         = aws_route53_zone.this.zone_id
  name            = "${each.key}.vote.${var.domain}"
  type            = "A"
  set_identifier  = "${each.key}-primary"
  health_check_id = aws_route53_health_check.region[each.key].id
  failover_routing_policy {
    type = "PRIMARY"
  }
  alias {
    name                   = each.value.alb_dns_name
    zone_id                = each.value.alb_zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "secondary" {
  for_each        = var.regions
  zone_id         = aws_route53_zone.this.zone_id
  name            = "${each.key}.vote.${var.domain}"
  type            = "A"
  set_identifier  = "${each.key}-secondary"
  health_check_id = aws_route53_health_check.region[each.value.failover_to].id
  failover_routing_policy {
    type = "SECONDARY"
  }
  alias {
    name                   = var.regions[each.value.failover_to].alb_dns_name
    zone_id                = var.regions[each.value.failover_to].alb_zone_id
    evaluate_target_health = true
  }
}

# vote.<domain> and results.<domain> answer alike: the same failover pairs, hence the same load
# balancers; the Host header takes a request to ingest or the reader.
locals {
  continent_region = merge([for k, r in var.regions : { for c in r.continents : c => k }]...)
  front_names      = ["vote", "results"]
  geo_records = { for pair in setproduct(local.front_names, keys(local.continent_region)) : "${pair[0]}-${pair[1]}" => {
    name      = pair[0]
    continent = pair[1]
    region    = local.continent_region[pair[1]]
  } }
}

resource "aws_route53_record" "continent" {
  for_each        = local.geo_records
  zone_id         = aws_route53_zone.this.zone_id
  name            = "${each.value.name}.${var.domain}"
  type            = "A"
  set_identifier  = "continent-${each.value.continent}"
  health_check_id = aws_route53_health_check.region[each.value.region].id
  geolocation_routing_policy {
    continent = each.value.continent
  }
  alias {
    name                   = aws_route53_record.primary[each.value.region].fqdn
    zone_id                = aws_route53_zone.this.zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "default" {
  for_each        = toset(local.front_names)
  zone_id         = aws_route53_zone.this.zone_id
  name            = "${each.key}.${var.domain}"
  type            = "A"
  set_identifier  = "default"
  health_check_id = aws_route53_health_check.region[var.default_region].id
  geolocation_routing_policy {
    country = "*"
  }
  alias {
    name                   = aws_route53_record.primary[var.default_region].fqdn
    zone_id                = aws_route53_zone.this.zone_id
    evaluate_target_health = true
  }
}

# Each region's reader by name, for the control room and rehearsals (`tally load --target`); it
# fails over as <region>.vote.<domain> does.
resource "aws_route53_record" "results_region" {
  for_each        = var.regions
  zone_id         = aws_route53_zone.this.zone_id
  name            = "${each.key}.results.${var.domain}"
  type            = "A"
  health_check_id = aws_route53_health_check.region[each.key].id
  set_identifier  = "${each.key}-results"
  weighted_routing_policy {
    weight = 1
  }
  alias {
    name                   = aws_route53_record.primary[each.key].fqdn
    zone_id                = aws_route53_zone.this.zone_id
    evaluate_target_health = true
  }
}

output "zone_id" {
  value = aws_route53_zone.this.zone_id
}
