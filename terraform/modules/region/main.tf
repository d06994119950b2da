# Everything one region runs, composed from the other modules: its network, EKS cluster, Redis
# shards, PostgreSQL (the primary, or a replica of it), its secret, and the KMS key they share.

variable "region" {
  type = string
  validation {
    condition     = contains(["us-east-1", "eu-west-1", "ap-southeast-1"], var.region)
    error_message = "Tally's regions are us-east-1, eu-west-1 and ap-southeast-1."
  }
}

variable "cidr" {
  type = string
}

variable "zones" {
  type = list(string)
}

variable "postgres_role" {
  type = string
}

variable "primary_db_arn" {
  type    = string
  default = null
}

variable "postgres_instance_class" {
  type = string
}

variable "redis_shards" {
  type = number
}

variable "node_max" {
  description = "Nodes at peak: enough 2-vCPU slots for the HPA maxima of this region."
  type        = number
}

variable "other_postgres_endpoints" {
  description = "The other regions' PostgreSQL endpoints (their roots' postgres_endpoint outputs)."
  type        = list(string)
  default     = []
}

variable "peer_cidrs" {
  description = "The other regions' VPCs: aggregators write to the primary across regions, replicas stream from it."
  type        = list(string)
}

variable "domain" {
  description = "The zone terraform/global makes: the Ingress serves vote., *.vote., results. and *.results. of it."
  type        = string
  default     = "tally.vote"
}

data "aws_caller_identity" "this" {}

# The ALB's certificate: every name Route53 may send to this region, its own and, on failover,
# the others' (k8s/base/common/ingress.yaml lists the same hosts).
resource "aws_acm_certificate" "public" {
  domain_name               = "vote.${var.domain}"
  subject_alternative_names = ["*.vote.${var.domain}", "results.${var.domain}", "*.results.${var.domain}"]
  validation_method         = "DNS"
  lifecycle {
    create_before_destroy = true
  }
}

data "aws_route53_zone" "public" {
  name = var.domain
}

resource "aws_route53_record" "certificate_validation" {
  for_each = { for o in aws_acm_certificate.public.domain_validation_options : o.domain_name => o }
  zone_id  = data.aws_route53_zone.public.zone_id
  name     = each.value.resource_record_name
  type     = each.value.resource_record_type
  records  = [each.value.resource_record_value]
  ttl      = 300
  # The wildcard and its base name share one validation record.
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "public" {
  certificate_arn         = aws_acm_certificate.public.arn
  validation_record_fqdns = [for r in aws_route53_record.certificate_validation : r.fqdn]
}

resource "aws_kms_key" "this" {
  description         = "Tally ${var.region}: data at rest, secrets, logs"
  enable_key_rotation = true
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
        Sid       = "LogsEncrypt"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*", "kms:DescribeKey"]
        Resource  = "*"
      },
    ]
  })
}

module "network" {
  source      = "../network"
  region      = var.region
  cidr        = var.cidr
  zones       = var.zones
  kms_key_arn = aws_kms_key.this.arn
}

resource "aws_security_group" "data" {
  name        = "tally-${var.region}-data"
  description = "Redis and PostgreSQL: reachable only from this VPC and the peered Tally VPCs"
  vpc_id      = module.network.vpc_id
  ingress {
    description = "Redis over TLS from the cluster"
    from_port   = 6379
    to_port     = 6379
    protocol    = "tcp"
    cidr_blocks = [var.cidr]
  }
  ingress {
    description = "PostgreSQL over TLS from every Tally region (cross-region writes, replication)"
    from_port   = 5432
    to_port     = 5432
    protocol    = "tcp"
    cidr_blocks = concat([var.cidr], var.peer_cidrs)
  }
  egress {
    description = "Replication to the peered regions' PostgreSQL"
    from_port   = 5432
    to_port     = 5432
    protocol    = "tcp"
    cidr_blocks = var.peer_cidrs
  }
}

module "eks" {
  source      = "../eks"
  region      = var.region
  subnet_ids  = module.network.private_subnet_ids
  kms_key_arn = aws_kms_key.this.arn
  node_groups = {
    tally = { instance_type = "c7g.xlarge", min_size = 3, max_size = var.node_max }
  }
}

module "waf" {
  source      = "../waf"
  region      = var.region
  kms_key_arn = aws_kms_key.this.arn
}

module "redis" {
  source             = "../redis"
  region             = var.region
  shards             = var.redis_shards
  subnet_ids         = module.network.private_subnet_ids
  security_group_ids = [aws_security_group.data.id]
  kms_key_arn        = aws_kms_key.this.arn
  reader_role_arns   = values(module.eks.irsa_role_arns)
}

resource "aws_iam_role" "rds_monitoring" {
  name = "tally-${var.region}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Principal = { Service = "monitoring.rds.amazonaws.com" }, Action = "sts:AssumeRole" }]
  })
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

module "postgres" {
  source              = "../postgres"
  region              = var.region
  role                = var.postgres_role
  replicate_source_db = var.primary_db_arn
  instance_class      = var.postgres_instance_class
  subnet_ids          = module.network.private_subnet_ids
  security_group_ids  = [aws_security_group.data.id]
  kms_key_arn         = aws_kms_key.this.arn
  monitoring_role_arn = aws_iam_role.rds_monitoring.arn
}

# The primary's logins: made by its module in the primary's region, read from the replicated
# tally/postgres everywhere else.
data "aws_secretsmanager_secret_version" "logins" {
  count     = var.postgres_role == "primary" ? 0 : 1
  secret_id = "tally/postgres"
}

module "secrets" {
  source             = "../secrets"
  region             = var.region
  kms_key_arn        = aws_kms_key.this.arn
  reader_role_arns   = values(module.eks.irsa_role_arns)
  postgres_endpoints = concat([module.postgres.endpoint], var.other_postgres_endpoints)
  logins             = var.postgres_role == "primary" ? module.postgres.logins : jsondecode(data.aws_secretsmanager_secret_version.logins[0].secret_string)
}

output "vpc_id" {
  value = module.network.vpc_id
}

output "postgres_arn" {
  value = module.postgres.arn
}

output "postgres_endpoint" {
  value = module.postgres.endpoint
}

output "redis_endpoints" {
  value = module.redis.endpoints
}

output "cluster_name" {
  value = module.eks.cluster_name
}

output "certificate_arn" {
  description = "The Ingress's alb.ingress.kubernetes.io/certificate-arn."
  value       = aws_acm_certificate_validation.public.certificate_arn
}

output "waf_acl_arn" {
  value = module.waf.arn
}

output "kms_key_arn" {
  value = aws_kms_key.this.arn
}
