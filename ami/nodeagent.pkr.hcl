# The nodeagent AMI: the latest Amazon ECS-optimized Amazon Linux 2023 AMI plus the nodeagent
# RPM, its units enabled, and the build instance's identity removed (`nodeagent prepare-image`).
#
#   packer init ami/                                   # packer >= 1.7 (ami/plugins.pkr.hcl)
#   packer build -var region=us-east-1 -var rpm=target/packages/nodeagent.rpm ami/
#
# Written for Packer 1.6.6 (Debian's, which CI validates this file with) as well as current
# Packer: no `data` sources, no `metadata_options`, no `content` in the file provisioner —
# 1.6.6 knows none of them. The `packer { required_plugins }` block is in plugins.pkr.hcl for
# the same reason; with 1.6.6 validate or build this file alone (`packer validate
# ami/nodeagent.pkr.hcl`). validate makes no AWS call: it needs no network and no credentials.

variable "region" {
  type        = string
  description = "The region the AMI is built in (and the build instance runs in)."
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "x86_64, or arm64 with an aarch64 RPM (cargo generate-rpm --target aarch64-unknown-linux-gnu)."
  validation {
    condition     = contains(["x86_64", "arm64"], var.arch)
    error_message = "The arch must be x86_64 or arm64 (EC2's names)."
  }
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "The build instance's type; empty: t3.small (x86_64) or t4g.small (arm64)."
}

variable "source_ami" {
  type        = string
  default     = ""
  description = "An AMI id to start from instead of the newest ECS-optimized AL2023 AMI, e.g. the SSM parameter /aws/service/ecs/optimized-ami/amazon-linux-2023/recommended/image_id (arm64: .../amazon-linux-2023/arm64/recommended/image_id)."
}

variable "rpm" {
  type        = string
  default     = "nodeagent.rpm"
  description = "The nodeagent RPM for var.arch (tests/packages.sh leaves the x86_64 one in target/packages/nodeagent.rpm)."
}

variable "extra_config" {
  type        = string
  default     = ""
  description = "TOML written to /etc/nodeagent/conf.d/50-image.toml (what every instance of this image shares); empty: no such file."
}

variable "ami_name_prefix" {
  type        = string
  default     = "nodeagent-ecs-al2023"
  description = "The AMI is named PREFIX-ARCH-TIMESTAMP."
}

variable "vpc_id" {
  type        = string
  default     = ""
  description = "The build instance's VPC; empty: the default VPC."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "The build instance's subnet (Packer reaches it over SSH); empty: one of the VPC's."
}

variable "require_imdsv2" {
  type        = bool
  default     = true
  description = "Fail the build when the build instance answers IMDSv1 requests (see the first provisioner)."
}

locals {
  # 20261123195425: ami_name allows no ':' (timestamp() is RFC 3339).
  timestamp     = regex_replace(timestamp(), "[- TZ:]", "")
  instance_type = var.instance_type != "" ? var.instance_type : (var.arch == "arm64" ? "t4g.small" : "t3.small")
  # The extra configuration crosses the shell as base64 (its alphabet needs no quoting), so no
  # quote, `$`, backquote or line break in it is ever interpreted: 1.6.6's file provisioner has
  # no `content =`, and an environment variable would still be a quoted shell word.
  extra_config_b64 = base64encode(var.extra_config)
}

source "amazon-ebs" "nodeagent" {
  region        = var.region
  instance_type = local.instance_type
  vpc_id        = var.vpc_id
  subnet_id     = var.subnet_id
  ssh_username  = "ec2-user"

  ami_name        = "${var.ami_name_prefix}-${var.arch}-${local.timestamp}"
  ami_description = "Amazon ECS-optimized Amazon Linux 2023 with nodeagent (${var.arch})"

  # source_ami alone (when set) picks the AMI; otherwise the newest Amazon-owned ECS-optimized
  # AL2023 AMI for the architecture. The name pattern leaves out the GPU
  # (al2023-ami-ecs-gpu-hvm-…) and Neuron (al2023-ami-ecs-neuron-hvm-…) variants; names look
  # like al2023-ami-ecs-hvm-2023.0.20261113-kernel-6.1-x86_64. (Both together would mean the
  # AMI must also match the filter: the filter block exists only without source_ami.)
  source_ami = var.source_ami
  dynamic "source_ami_filter" {
    for_each = var.source_ami == "" ? ["newest"] : []
    content {
      filters = {
        name                = "al2023-ami-ecs-hvm-*-kernel-*-${var.arch}"
        architecture        = var.arch
        virtualization-type = "hvm"
        root-device-type    = "ebs"
      }
      owners      = ["amazon"]
      most_recent = true
    }
  }

  # Interpolated by the builder at build time.
  tags = {
    Name            = "${var.ami_name_prefix}-${var.arch}-${local.timestamp}"
    source_ami      = "{{ .SourceAMI }}"
    source_ami_name = "{{ .SourceAMIName }}"
    arch            = var.arch
  }
  run_tags = {
    Name = "packer: ${var.ami_name_prefix}-${var.arch}"
  }
}

build {
  sources = ["source.amazon-ebs.nodeagent"]

  # IMDSv2 only on the build instance. Packer 1.6.6's amazon-ebs has no `metadata_options`, so
  # this is checked, not set: an AMI registered with ImdsSupport v2.0 launches with
  # HttpTokens=required, as does an account whose instance-metadata defaults require tokens
  # (aws ec2 modify-instance-metadata-defaults --http-tokens required). IMDSv1 — a request
  # without a token — then gets 401. (With packer >= 1.7, a metadata_options block here would
  # set it, but this file could no longer be validated with 1.6.6.)
  #
  # It first waits for the first boot to finish: cloud-init, and ecs.service which the ECS AMI
  # orders after it, still run when SSH first answers, and the steps below must not race them
  # (exit 2: done with recoverable errors, from cloud-init 23.4 on).
  provisioner "shell" {
    inline = [
      "sudo cloud-init status --wait >/dev/null || test $? -eq 2",
      "code=$(curl -s -o /dev/null -w '%%{http_code}' http://169.254.169.254/latest/meta-data/instance-id)",
      "if [ \"$code\" = 401 ]; then echo 'IMDSv2 only: an IMDSv1 request got 401'; else echo \"the build instance answers IMDSv1 requests (HTTP $code): IMDSv2 is not required (set require_imdsv2=false to build anyway)\" >&2; ${var.require_imdsv2 ? "exit 1" : "true"}; fi",
    ]
  }

  provisioner "file" {
    source      = var.rpm
    destination = "/tmp/nodeagent.rpm"
  }

  # --disablerepo: nodeagent needs nothing the ECS AMI lacks (systemd), so the image is the
  # source AMI's packages plus nodeagent, and the build needs no package repository.
  provisioner "shell" {
    inline = [
      "sudo dnf install -y --disablerepo='*' /tmp/nodeagent.rpm",
      "rm -f /tmp/nodeagent.rpm",
      "rpm -q nodeagent",
    ]
  }

  # The image's own layer of configuration (see README, "Configuration"): between the packaged
  # /etc/nodeagent/nodeagent.toml and the per-group user-data and tags.
  provisioner "shell" {
    inline = concat(
      var.extra_config == "" ? ["echo 'extra_config is empty: no /etc/nodeagent/conf.d/50-image.toml'"] : [
        "echo '${local.extra_config_b64}' | base64 -d > /tmp/50-image.toml",
        "sudo install -D -o root -g root -m 0644 /tmp/50-image.toml /etc/nodeagent/conf.d/50-image.toml",
        "rm -f /tmp/50-image.toml",
        "echo 'wrote /etc/nodeagent/conf.d/50-image.toml'",
      ],
      # Types, unknown keys, paths, templates: a bad configuration fails the build (exit 2),
      # not every instance's boot. It reads files only: no AWS, no instance metadata.
      ["sudo nodeagent config check"],
    )
  }

  # nodeagent-prepare.service is RequiredBy=ecs.service: the cluster is in ecs.config before
  # the ECS agent starts. Enabled, not started: nothing of nodeagent runs on the build instance.
  provisioner "shell" {
    inline = [
      "sudo systemctl enable nodeagent.service nodeagent-prepare.service",
    ]
  }

  # The ECS AMI started its agent at boot (into the "default" cluster, or failing to, the build
  # instance having no role); prepare-image refuses while the agent answers or any container
  # runs. ecs.service stays enabled: only this boot's agent stops. ecs-init's stop leaves the
  # agent's container behind, exited: removed too (the next start would replace it anyway).
  provisioner "shell" {
    inline = [
      "sudo systemctl stop ecs.service",
      "if sudo docker container inspect ecs-agent >/dev/null 2>&1; then sudo docker rm ecs-agent; fi",
      "sudo docker ps --all",
    ]
  }

  # Last: what identifies this build instance goes. The operating system's part, as the ECS
  # AMI's own build does it — cloud-init's state and logs (the next boot is a first boot again),
  # the machine id (regenerated at first boot; shared, it would give every instance the same
  # DHCP identity and journal id), the build's SSH key (cloud-init appends each instance's key
  # and would keep it; this SSH session stays open without it). Then nodeagent's part: the ECS
  # agent's state, task directories, rendered files, nodeagent's record and its ecs.config
  # keys (README, "Images"); it refuses while nodeagent, the ECS agent or a container runs.
  provisioner "shell" {
    inline = [
      "sudo cloud-init clean --logs",
      "sudo truncate -s 0 /etc/machine-id",
      "rm -f /home/ec2-user/.ssh/authorized_keys",
      "sudo nodeagent prepare-image",
    ]
  }
}
