# One region's web application firewall, in front of its load balancer (the Ingress names it):
# a rate rule per client address, and AWS's managed rule groups for common exploits, known bad
# inputs and addresses with a bad reputation. Ingest limits voters and addresses again behind it.

variable "region" {
  type = string
}

variable "kms_key_arn" {
  type = string
}

variable "requests_per_address" {
  description = "Requests one client address may send in 5 minutes before it is blocked."
  type        = number
  default     = 3000
  validation {
    condition     = var.requests_per_address >= 100
    error_message = "WAF rate rules count at least 100 requests in their window."
  }
}

locals {
  managed_rule_groups = [
    "AWSManagedRulesCommonRuleSet",
    "AWSManagedRulesKnownBadInputsRuleSet",
    "AWSManagedRulesAmazonIpReputationList",
  ]
}

resource "aws_wafv2_web_acl" "this" {
  name  = "tally-${var.region}"
  scope = "REGIONAL"

  default_action {
    allow {}
  }

  rule {
    name     = "votes-per-address"
    priority = 0
    action {
      block {}
    }
    statement {
      rate_based_statement {
        limit              = var.requests_per_address
        aggregate_key_type = "IP"
      }
    }
    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "tally-${var.region}-votes-per-address"
      sampled_requests_enabled   = true
    }
  }

  dynamic "rule" {
    for_each = local.managed_rule_groups
    content {
      name     = rule.value
      priority = rule.key + 1
      override_action {
        none {}
      }
      statement {
        managed_rule_group_statement {
          name        = rule.value
          vendor_name = "AWS"
        }
      }
      visibility_config {
        cloudwatch_metrics_enabled = true
        metric_name                = "tally-${var.region}-${rule.value}"
        sampled_requests_enabled   = true
      }
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = "tally-${var.region}"
    sampled_requests_enabled   = true
  }
}

# WAF's log group must be named aws-waf-logs-*.
resource "aws_cloudwatch_log_group" "waf" {
  name              = "aws-waf-logs-tally-${var.region}"
  retention_in_days = 365
  kms_key_id        = var.kms_key_arn
}

resource "aws_wafv2_web_acl_logging_configuration" "this" {
  resource_arn            = aws_wafv2_web_acl.this.arn
  log_destination_configs = [aws_cloudwatch_log_group.waf.arn]
}

output "arn" {
  description = "The Ingress's alb.ingress.kubernetes.io/wafv2-acl-arn (each k8s overlay's)."
  value       = aws_wafv2_web_acl.this.arn
}
