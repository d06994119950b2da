# One region's Redis shards: one ElastiCache replication group per shard (Tally shards by key in
# the client; cluster mode off, so the queue's multi-key scripts run as written). Each shard is a
# primary and two replicas in other zones with automatic failover. ElastiCache replicates
# asynchronously and has no append-only file on Multi-AZ groups, so ingest acknowledges a vote
# only once a replica holds it (TALLY_WAIT_REPLICAS=1): a failover promotes the replica furthest
# along, which has every acknowledged vote, and the other replica keeps the wait possible
# meanwhile. terraform/README.md says why this and not MemoryDB.
#
# Access is per role (RBAC): ingest and the aggregator log in as users of their own whose access
# strings are exactly model::queue's ACLs (scripts/check-deploy compares them); the default user
# is disabled. Their URLs, TLS and passwords included, go to the secret tally/<region>/redis.

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

variable "replicas" {
  description = "Replicas per shard. Ingest waits for one; a second keeps that possible while a failed node is replaced."
  type        = number
  default     = 2
  validation {
    condition     = var.replicas >= 2 && var.replicas <= 5
    error_message = "Each shard needs at least two replicas: one for ingest's wait, one to spare."
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

variable "reader_role_arns" {
  description = "The IRSA roles allowed to read the URLs' secret."
  type        = list(string)
}

locals {
  # model::queue::INGEST_ACL and AGGREGATOR_ACL, after `on`.
  access = {
    ingest     = "on ~tally:votes -@all +rpush +multi +exec +wait +ping +role (~tally:votes:stored +incrby +get)"
    aggregator = "on ~tally:votes ~tally:votes:stored ~tally:inflight:* ~tally:dead ~tally:moved ~tally:inflight ~tally:close:* ~tally:lease:* -@all +lpop +blmove +lrange +del +scan +llen +exists +evalsha +eval +script|load +ping +role (~tally:inflight:* ~tally:dead +rpush +rename) (~tally:votes:stored +decrby +set +get) (~tally:moved +incrby +get) (~tally:inflight +zadd +zrem +zrangebyscore +zscore) (~tally:close:* +set +get) (~tally:lease:* +set +del)"
  }
}

resource "aws_elasticache_subnet_group" "this" {
  name       = "tally-${var.region}"
  subnet_ids = var.subnet_ids
}

# A queue must refuse a write when full (ingest answers 503), never evict a vote or a lease.
resource "aws_elasticache_parameter_group" "this" {
  name   = "tally-${var.region}"
  family = "redis7"
  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "random_password" "role" {
  for_each = local.access
  length   = 48
  special  = false
}

resource "aws_elasticache_user" "role" {
  for_each      = local.access
  user_id       = "tally-${var.region}-${each.key}"
  user_name     = "tally-${each.key}"
  engine        = "REDIS"
  access_string = each.value
  authentication_mode {
    type      = "password"
    passwords = [random_password.role[each.key].result]
  }
}

# ElastiCache puts a user named `default` in every group; this one can do nothing.
resource "aws_elasticache_user" "default" {
  user_id       = "tally-${var.region}-default"
  user_name     = "default"
  engine        = "REDIS"
  access_string = "off -@all"
  authentication_mode {
    type = "no-password-required"
  }
}

resource "aws_elasticache_user_group" "this" {
  user_group_id = "tally-${var.region}"
  engine        = "REDIS"
  user_ids      = concat([aws_elasticache_user.default.user_id], [for u in aws_elasticache_user.role : u.user_id])
}

resource "aws_elasticache_replication_group" "shard" {
  count                      = var.shards
  replication_group_id       = "tally-${var.region}-${count.index}"
  description                = "Tally vote queue, ${var.region} shard ${count.index}"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = var.node_type
  num_cache_clusters         = 1 + var.replicas
  automatic_failover_enabled = true
  multi_az_enabled           = true
  parameter_group_name       = aws_elasticache_parameter_group.this.name
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = var.security_group_ids
  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  user_group_ids             = [aws_elasticache_user_group.this.id]
  snapshot_retention_limit   = 7
  auto_minor_version_upgrade = true
}

# Each role's URLs, shard order, through the primary endpoint (its name follows a failover).
resource "aws_secretsmanager_secret" "urls" {
  # checkov:skip=CKV2_AWS_57:The passwords rotate by tainting random_password.role and applying; ElastiCache takes two passwords per user, so a rotation keeps connections working.
  name       = "tally/${var.region}/redis"
  kms_key_id = var.kms_key_arn
}

resource "aws_secretsmanager_secret_policy" "urls" {
  secret_arn = aws_secretsmanager_secret.urls.arn
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { AWS = var.reader_role_arns }
      Action    = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
      Resource  = "*"
    }]
  })
}

resource "aws_secretsmanager_secret_version" "urls" {
  secret_id = aws_secretsmanager_secret.urls.id
  secret_string = jsonencode({
    for role, _ in local.access : "${role}-redis-urls" => join(",", [
      for g in aws_elasticache_replication_group.shard :
      "rediss://${aws_elasticache_user.role[role].user_name}:${random_password.role[role].result}@${g.primary_endpoint_address}:6379"
    ])
  })
}

output "secret_arn" {
  description = "The secret holding ingest-redis-urls and aggregator-redis-urls."
  value       = aws_secretsmanager_secret.urls.arn
}

output "endpoints" {
  description = "Each shard's primary endpoint, in shard order."
  value       = [for g in aws_elasticache_replication_group.shard : g.primary_endpoint_address]
}
