# The region's Tally secrets. tally/<region>: the CAs (tls-ca.pem). tally/<region>/postgres: each
# role's PostgreSQL URL with its own least-privilege user and password. tally/<region>/migrate:
# the owner's URL and the roles' passwords, for the migration Job only. (The Redis URLs are in
# tally/<region>/redis, modules/redis.) External Secrets copies them into the cluster; only that
# region's IRSA roles may read them.

variable "region" {
  type = string
}

variable "kms_key_arn" {
  type = string
}

variable "reader_role_arns" {
  description = "The IRSA roles allowed to read the secret."
  type        = list(string)
  validation {
    condition     = length(var.reader_role_arns) > 0
    error_message = "Name at least one role that may read the secret."
  }
}

variable "postgres_endpoints" {
  description = "Every region's PostgreSQL endpoint, this region's first: writers find the primary among them (target_session_attrs=read-write), readers prefer their own."
  type        = list(string)
  validation {
    condition     = length(var.postgres_endpoints) > 0
    error_message = "Name at least this region's endpoint."
  }
}

variable "logins" {
  description = "tally/postgres's JSON: owner-user and each login's password."
  type        = map(string)
  sensitive   = true
}

locals {
  hosts = join(",", var.postgres_endpoints)
  # Tally's rustls verifies the chain and the name, so `require` is what libpq calls verify-full.
  url = { for role in ["ingest", "aggregator", "reader", "owner"] : role => format(
    "host=%s user=%s password=%s dbname=tally sslmode=require target_session_attrs=%s",
    local.hosts, role == "owner" ? var.logins["owner-user"] : "tally_${role}", var.logins["${role}-password"],
    role == "reader" ? "any" : "read-write",
  ) }
}

# tally/<region>/postgres (the roles' logins) and tally/<region>/migrate (the Job's).
locals {
  login_secrets = {
    postgres = {
      "ingest-postgres-url"     = local.url["ingest"]
      "aggregator-postgres-url" = local.url["aggregator"]
      "reader-postgres-sources" = local.url["reader"]
    }
    migrate = {
      "owner-postgres-url"     = local.url["owner"]
      "ingest-db-password"     = var.logins["ingest-password"]
      "aggregator-db-password" = var.logins["aggregator-password"]
      "reader-db-password"     = var.logins["reader-password"]
    }
  }
}

resource "aws_secretsmanager_secret" "logins" {
  # checkov:skip=CKV2_AWS_57:Its passwords rotate with tally/postgres (modules/postgres); this version is rewritten then.
  # Named literally: keys drawn from a map of sensitive values would be refused by for_each.
  for_each   = toset(["postgres", "migrate"])
  name       = "tally/${var.region}/${each.key}"
  kms_key_id = var.kms_key_arn
}

resource "aws_secretsmanager_secret_version" "logins" {
  for_each      = aws_secretsmanager_secret.logins
  secret_id     = each.value.id
  secret_string = jsonencode(local.login_secrets[each.key])
}

resource "aws_secretsmanager_secret" "this" {
  # checkov:skip=CKV2_AWS_57:It holds only the CAs, which change with their issuers, not on a schedule.
  name       = "tally/${var.region}"
  kms_key_id = var.kms_key_arn
}

# The roles may read the CAs and their own logins. tally/<region>/migrate gets no such grant:
# only the migration Job's copy, made by External Secrets, holds the owner's credentials.
resource "aws_secretsmanager_secret_policy" "this" {
  for_each = {
    cas      = aws_secretsmanager_secret.this.arn
    postgres = aws_secretsmanager_secret.logins["postgres"].arn
  }
  secret_arn = each.value
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

output "arn" {
  value = aws_secretsmanager_secret.this.arn
}
