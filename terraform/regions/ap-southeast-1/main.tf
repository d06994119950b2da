# ap-southeast-1: one root per region, so a plan touches one region at a time. Sizes are `tally capacity`'s.
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
    key            = "regions/ap-southeast-1.tfstate"
    region         = "us-east-1"
    encrypt        = true
    dynamodb_table = "tally-terraform-locks"
  }
}

provider "aws" {
  region = "ap-southeast-1"
  default_tags {
    tags = { Project = "tally", Region = "ap-southeast-1" }
  }
}

# The primary is us-east-1's; its ARN comes from that root's state.
data "terraform_remote_state" "primary" {
  backend = "s3"
  config = {
    bucket = "tally-terraform-state"
    key    = "regions/us-east-1.tfstate"
    region = "us-east-1"
  }
}

# The other regions' PostgreSQL endpoints, for the URLs that find the primary among all of them.
# A region not yet applied is left out; apply it, then this root again.
data "terraform_remote_state" "peers" {
  for_each = toset(["us-east-1", "eu-west-1"])
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
  region                   = "ap-southeast-1"
  cidr                     = "10.3.0.0/16"
  zones                    = ["ap-southeast-1a", "ap-southeast-1b", "ap-southeast-1c"]
  peer_cidrs               = ["10.1.0.0/16", "10.2.0.0/16"]
  postgres_role            = "replica"
  primary_db_arn           = data.terraform_remote_state.primary.outputs.postgres_arn
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

output "waf_acl_arn" {
  description = "Set it as the Ingress's alb.ingress.kubernetes.io/wafv2-acl-arn in k8s/overlays/ap-southeast-1."
  value       = module.region.waf_acl_arn
}

output "postgres_endpoint" {
  value = module.region.postgres_endpoint
}
