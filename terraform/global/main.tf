# What spans the regions: the Route53 zone, geolocation and failover records and health checks.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.70"
    }
  }
  backend "s3" {
    bucket         = "tally-terraform-state"
    key            = "global.tfstate"
    region         = "us-east-1"
    encrypt        = true
    dynamodb_table = "tally-terraform-locks"
  }
}

provider "aws" {
  region = "us-east-1"
}

variable "load_balancers" {
  description = "Each region's public ALB (created by the AWS Load Balancer Controller from k8s/)."
  type = map(object({
    dns_name = string
    zone_id  = string
  }))
  validation {
    condition     = toset(keys(var.load_balancers)) == toset(["us-east-1", "eu-west-1", "ap-southeast-1"])
    error_message = "Give the load balancer of each of us-east-1, eu-west-1 and ap-southeast-1."
  }
}

data "terraform_remote_state" "us_east_1" {
  backend = "s3"
  config = {
    bucket = "tally-terraform-state"
    key    = "regions/us-east-1.tfstate"
    region = "us-east-1"
  }
}

module "dns" {
  source           = "../modules/dns"
  domain           = "tally.vote"
  default_region   = "us-east-1"
  logs_kms_key_arn = data.terraform_remote_state.us_east_1.outputs.kms_key_arn
  regions = {
    "us-east-1" = {
      alb_dns_name = var.load_balancers["us-east-1"].dns_name
      alb_zone_id  = var.load_balancers["us-east-1"].zone_id
      continents   = ["NA", "SA"]
      failover_to  = "eu-west-1"
    }
    "eu-west-1" = {
      alb_dns_name = var.load_balancers["eu-west-1"].dns_name
      alb_zone_id  = var.load_balancers["eu-west-1"].zone_id
      continents   = ["EU", "AF"]
      failover_to  = "us-east-1"
    }
    "ap-southeast-1" = {
      alb_dns_name = var.load_balancers["ap-southeast-1"].dns_name
      alb_zone_id  = var.load_balancers["ap-southeast-1"].zone_id
      continents   = ["AS", "OC"]
      failover_to  = "us-east-1"
    }
  }
}

output "zone_id" {
  value = module.dns.zone_id
}
