# The region's Tally secret (tally/<region>): each role's PostgreSQL URL with its own
# least-privilege user, and the CAs (the Redis URLs are in tally/<region>/redis, modules/redis).
# External Secrets copies it into the cluster; only that region's three IRSA roles may read it.

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

resource "aws_secretsmanager_secret" "this" {
  # checkov:skip=CKV2_AWS_57:Its parts rotate at their source (RDS's managed master password by RDS); this secret is rewritten then.
  name       = "tally/${var.region}"
  kms_key_id = var.kms_key_arn
}

resource "aws_secretsmanager_secret_policy" "this" {
  secret_arn = aws_secretsmanager_secret.this.arn
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
