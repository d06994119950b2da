# One region's Redis shards: one ElastiCache replication group per shard (Tally shards by key in
# the client, so each shard is a primary with a replica in another zone, automatic failover,
# append-only persistence, TLS in transit, an AUTH token, encryption at rest).

variable "region" {
  type = string
}

variable "shards" {
  description = "Redis shards in this region (from `tally capacity`)."
  type        = number
  validation {
    condition     = var.shards >= 1 && var.shards <= 16
    error_message = "A region runs between 1 and 16 Redis shards."
  }
}

variable "node_type" {
  type    = string
  default = "cache.r7g.large"
}

variable "subnet_ids" {
  type = list(string)
}

variable "security_group_ids" {
  type = list(string)
}

variable "kms_key_arn" {
  type = string
}

variable "auth_token" {
  type      = string
  sensitive = true
  validation {
    condition     = length(var.auth_token) >= 32
    error_message = "The Redis AUTH token must be at least 32 characters."
  }
}

resource "aws_elasticache_subnet_group" "this" {
  name       = "tally-${var.region}"
  subnet_ids = var.subnet_ids
}

resource "aws_elasticache_parameter_group" "this" {
  name   = "tally-${var.region}"
  family = "redis7"
  parameter {
    name  = "appendonly"
    value = "yes"
  }
  parameter {
    name  = "appendfsync"
    value = "everysec"
  }
}

resource "aws_elasticache_replication_group" "shard" {
  count                      = var.shards
  replication_group_id       = "tally-${var.region}-${count.index}"
  description                = "Tally vote queue, ${var.region} shard ${count.index}"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = var.node_type
  num_cache_clusters         = 2
  automatic_failover_enabled = true
  multi_az_enabled           = true
  parameter_group_name       = aws_elasticache_parameter_group.this.name
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = var.security_group_ids
  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn
  transit_encryption_enabled = true
  auth_token                 = var.auth_token
  snapshot_retention_limit   = 7
  auto_minor_version_upgrade = true
}

output "urls" {
  description = "rediss:// URLs in shard order, without the token (ingest and aggregator read it from the secret)."
  value       = [for g in aws_elasticache_replication_group.shard : "rediss://${g.primary_endpoint_address}:6379"]
}
