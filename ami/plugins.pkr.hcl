# Packer >= 1.7 only: `packer init ami/` installs the Amazon plugin (Packer 1.10 and later no
# longer bundle it). Packer 1.6.6 has no `required_plugins` and rejects this block, which is why
# it is alone in this file: with 1.6.6, validate or build ami/nodeagent.pkr.hcl by itself.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.0.0, < 2.0.0"
    }
  }
}
