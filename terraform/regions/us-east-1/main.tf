# us-east-1: one root per region, so a plan touches one region at a time. Sizes are `tally capacity`'s.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.70"
    }
    tls = {
      source  = "hashicorp/tls"
      version = "~> 4.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
  backend "s3" {
    bucket         = "tally-terraform-state"
    key            = "regions/us-east-1.tfstate"
    region         = "us-east-1"
    encrypt        = true
    dynamodb_table = "tally-terraform-locks"
  }
}

provider "aws" {
  region = "us-east-1"
  default_tags {
    tags = { Project = "tally", Region = "us-east-1" }
  }
}

# The other regions' PostgreSQL endpoints, for the URLs that find the primary among all of them.
# A region not yet applied is left out; apply it, then this root again.
data "terraform_remote_state" "peers" {
  for_each = toset(["eu-west-1", "ap-southeast-1"])
  backend  = "s3"
  config = {
    bucket = "tally-terraform-state"
    key    = "regions/${each.key}.tfstate"
    region = "us-east-1"
  }
  defaults = {
    postgres_endpoint = null
  }
}

module "region" {
  source                   = "../../modules/region"
  region                   = "us-east-1"
  cidr                     = "10.1.0.0/16"
  zones                    = ["us-east-1a", "us-east-1b", "us-east-1c"]
  peer_cidrs               = ["10.2.0.0/16", "10.3.0.0/16"]
  postgres_role            = "primary"
  postgres_instance_class  = "db.r6g.2xlarge"
  redis_shards             = 3
  node_max                 = 10
  other_postgres_endpoints = compact([for peer in data.terraform_remote_state.peers : peer.outputs.postgres_endpoint])
}

output "postgres_arn" {
  value = module.region.postgres_arn
}

output "redis_endpoints" {
  value = module.region.redis_endpoints
}

output "kms_key_arn" {
  value = module.region.kms_key_arn
}

output "waf_acl_arn" {
  description = "Set it as the Ingress's alb.ingress.kubernetes.io/wafv2-acl-arn in k8s/overlays/us-east-1."
  value       = module.region.waf_acl_arn
}

output "postgres_endpoint" {
  value = module.region.postgres_endpoint
}
