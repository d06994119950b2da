# PostgreSQL: the Multi-AZ primary (us-east-1), or a cross-region read replica of it (every other
# region). Encrypted, SSL required by the parameter group, IAM auth, logs exported. A replica is
# promoted by `tally replication` (RDS: promote read replica) when the primary's region fails.

variable "region" {
  type = string
}

variable "role" {
  description = "\"primary\", or \"replica\" of replicate_source_db."
  type        = string
  validation {
    condition     = contains(["primary", "replica"], var.role)
    error_message = "The role is primary or replica."
  }
}

variable "replicate_source_db" {
  description = "The primary's ARN, for a replica."
  type        = string
  default     = null
}

variable "instance_class" {
  description = "From `tally capacity` (8 vCPUs for 250,000 votes/s)."
  type        = string
  validation {
    condition     = can(regex("^db\\.(r6g|r7g|m6g|m7g)\\.", var.instance_class))
    error_message = "Use a Graviton memory- or general-purpose class (db.r6g, db.r7g, db.m6g, db.m7g)."
  }
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

variable "monitoring_role_arn" {
  type = string
}

variable "replica_regions" {
  description = "Where the primary's credentials secret is replicated: every region that runs `tally migrate` or composes URLs."
  type        = list(string)
  default     = ["eu-west-1", "ap-southeast-1"]
}

# The owner's and each role's passwords, made once with the primary. Roles are cluster-wide, so
# every replica has the same ones. `tally migrate` (k8s/base/migrate) sets the roles' passwords
# as SCRAM verifiers; the roles never log in as the owner.
locals {
  logins = var.role == "primary" ? toset(["owner", "ingest", "aggregator", "reader"]) : toset([])
}

resource "random_password" "login" {
  for_each = local.logins
  length   = 48
  special  = false
}

resource "aws_secretsmanager_secret" "logins" {
  # checkov:skip=CKV2_AWS_57:Rotated by tainting random_password.login and applying, then running the migration Job, which sets the roles' new passwords.
  count      = var.role == "primary" ? 1 : 0
  name       = "tally/postgres"
  kms_key_id = var.kms_key_arn
  dynamic "replica" {
    for_each = var.replica_regions
    content {
      region = replica.value
    }
  }
}

resource "aws_secretsmanager_secret_version" "logins" {
  count     = var.role == "primary" ? 1 : 0
  secret_id = aws_secretsmanager_secret.logins[0].id
  secret_string = jsonencode(merge(
    { "owner-user" = "tally_admin" },
    { for login, p in random_password.login : "${login}-password" => p.result },
  ))
}

resource "aws_db_subnet_group" "this" {
  name       = "tally-${var.region}"
  subnet_ids = var.subnet_ids
}

resource "aws_db_parameter_group" "this" {
  name   = "tally-${var.region}"
  family = "postgres16"
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
  parameter {
    name  = "wal_compression"
    value = "on"
  }
}

resource "aws_db_instance" "this" {
  identifier                          = "tally-${var.region}"
  engine                              = var.role == "primary" ? "postgres" : null
  engine_version                      = var.role == "primary" ? "16.4" : null
  instance_class                      = var.instance_class
  allocated_storage                   = var.role == "primary" ? 500 : null
  storage_type                        = "gp3"
  storage_encrypted                   = true
  kms_key_id                          = var.kms_key_arn
  replicate_source_db                 = var.role == "replica" ? var.replicate_source_db : null
  username                            = var.role == "primary" ? "tally_admin" : null
  password                            = var.role == "primary" ? random_password.login["owner"].result : null
  db_subnet_group_name                = aws_db_subnet_group.this.name
  vpc_security_group_ids              = var.security_group_ids
  parameter_group_name                = aws_db_parameter_group.this.name
  multi_az                            = true
  publicly_accessible                 = false
  iam_database_authentication_enabled = true
  backup_retention_period             = 14
  deletion_protection                 = true
  copy_tags_to_snapshot               = true
  auto_minor_version_upgrade          = true
  performance_insights_enabled        = true
  performance_insights_kms_key_id     = var.kms_key_arn
  monitoring_interval                 = 15
  monitoring_role_arn                 = var.monitoring_role_arn
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "tally-${var.region}-final"
}

output "arn" {
  value = aws_db_instance.this.arn
}

output "endpoint" {
  value = aws_db_instance.this.address
}

output "logins" {
  description = "owner-user and each login's password (the primary only; tally/postgres elsewhere)."
  value       = var.role == "primary" ? merge({ "owner-user" = "tally_admin" }, { for login, p in random_password.login : "${login}-password" => p.result }) : {}
  sensitive   = true
}
