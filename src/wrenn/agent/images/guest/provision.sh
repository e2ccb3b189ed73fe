#!/bin/sh
# Turns a minbase Debian tree into a Wrenn guest root filesystem. Runs as PID 1 of a private
# mount namespace, chrooted into the tree: its mounts vanish with it. Inputs, from the
# environment:
#   WRENN_SUITE, WRENN_MIRROR, WRENN_SECURITY_MIRROR   apt sources
#   WRENN_PACKAGES         apt packages of the image (space separated)
#   WRENN_KERNEL_PACKAGE   the distro kernel package; its initrd is built with
#   WRENN_INITRD_MODULES   the modules the initrd must carry (space separated)
#   WRENN_USER             the default unprivileged user, with passwordless sudo
# The builder has put the wheelhouse, wrenn-init and chrony.conf under /wrenn-build.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys

step() { echo "### $*"; }

step "apt sources"
cat > /etc/apt/sources.list <<SOURCES
deb $WRENN_MIRROR $WRENN_SUITE main
deb $WRENN_MIRROR $WRENN_SUITE-updates main
deb $WRENN_SECURITY_MIRROR $WRENN_SUITE-security main
SOURCES
# Package scripts must not start services inside the build.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d

step "initrd modules"
mkdir -p /etc/initramfs-tools/conf.d
echo "MODULES=list" > /etc/initramfs-tools/conf.d/wrenn.conf
: > /etc/initramfs-tools/modules
for module in $WRENN_INITRD_MODULES; do echo "$module" >> /etc/initramfs-tools/modules; done

step "apt packages"
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $WRENN_PACKAGES initramfs-tools "$WRENN_KERNEL_PACKAGE"

step "user $WRENN_USER"
useradd --create-home --shell /bin/bash --groups sudo "$WRENN_USER"
echo "$WRENN_USER ALL=(ALL:ALL) NOPASSWD: ALL" > /etc/sudoers.d/90-wrenn-user
chmod 440 /etc/sudoers.d/90-wrenn-user

step "envd"
python3 -m venv /opt/wrenn
/opt/wrenn/bin/pip install --quiet --no-index --no-cache-dir --find-links /wrenn-build/wheels wrenn
for pkg in $WRENN_HOST_ONLY_PACKAGES; do
    rm -rf /opt/wrenn/lib/python3*/site-packages/wrenn/"$pkg"
done
/opt/wrenn/bin/wrenn-envd --help > /dev/null

step "wrenn-init"
install -m 755 /wrenn-build/wrenn-init /usr/sbin/wrenn-init
install -m 644 /wrenn-build/chrony.conf /etc/chrony/wrenn.conf
echo wrenn > /etc/hostname
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\twrenn\n' > /etc/hosts
echo "nameserver 8.8.8.8" > /etc/resolv.conf

step "clean"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/sbin/policy-rc.d
