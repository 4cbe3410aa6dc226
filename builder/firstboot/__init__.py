"""First boot of the appliance, on the card: the setup wizard on the serial console(s) and
the screen, the headless preseed file, and `jupyter-setup` to change things later.

The package runs inside the image with the image's own python3 (Python 3.11+, standard library
only, except that Jupyter's TLS certificate is made and read with Debian's
python3-cryptography, which the image installs, imported only then). The card gets it as one
file, /usr/lib/orangepi-jupyter/firstboot.pyz: a zipapp of this package, builder/__init__.py
and builder/files.py, made by bundle.py during the build
(customize.d/50-install-firstboot.host); /usr/local/sbin/jupyter-setup links to it. On the
host, `python -m builder.firstboot` runs the same program, and builder/preseed.py imports
answers.py alone to check a `--preseed` file before a build. Every path is taken relative to a
root directory (`--root`, "/" on the card), so tests run it against a temporary tree on a
pseudo-terminal.

The modules, each importing only those above it:

  card.py     where first boot keeps things on the card, the builder's settings, SetupError
  answers.py  the checks of each answer, the password hashes, the preseed file's format
  network.py  the board's addresses, and Jupyter's URL on a host
  tls.py      Jupyter's certificate: made, read, checked, its fingerprint (PEM in, PEM out)
  netconf.py  the network (Wi-Fi, its country, a static address) and the locale, for
              whichever stack the image has (netplan, NetworkManager, systemd-networkd)
  system.py   applying answers to the card (passwords, hostname, ..., the certificate, the
              stamp last)
  armbian_preset.py  Armbian's first-login presets (/root/.not_logged_in_yet, as Armbian
              Imager writes them) read as settings, never run, mapped to preseed lines
  setup_drive.py  the setup drive (FAT, after the root) and Armbian's presets read into the
              preseed; the drive wiped and removed before the root grows
              (jupyter-setup-drive.service, `--setup-drive`)
  result.py   where to open Jupyter: the URLs, the fingerprint, a QR code, the result text
  console.py  a console's line: its terminal settings, a line read with a timeout, noise
  wizard.py   the questions
  session.py  first boot on one console among several; jupyter-setup after it
  cli.py      jupyter-setup's command line (also the unit's `--boot` and the host's `--check`)
  bundle.py   the card's zipapp, built on the host (not in the zipapp itself)

How first boot goes (one `jupyter-firstboot@<tty>.service` per console, ordered before that
console's getty and before jupyter.service, each running `firstboot.pyz --boot`):

  0. Before anything else, jupyter-setup-drive.service takes what Armbian's presets and the
     setup drive (the FAT partition after the root) say into the preseed, each over the one
     before, removes the presets file and the drive.
  1. Each console shows a banner, and what the setup drive said. A preseed file
     (card.PRESEED) is read and checked; problems are shown on every console. If it answers
     everything, whichever instance gets the lock first applies it and every console shows
     the result.
  2. Otherwise the console where someone presses Enter first owns the session (a lock in
     /run); the others say "setup is running on <tty>" and show the result when it is done.
  3. The owner asks what the preseed did not answer, then applies it all: login password,
     root, hostname, timezone, locale, SSH keys (also fetched from a URL), the network
     (Wi-Fi, a static address), Jupyter's TLS certificate (the user's from
     /boot, or the card's own), Jupyter credentials (card.CREDENTIALS, 0600), then the stamp
     (card.STAMP) - only after everything else - then removes the preseed file and starts
     Jupyter. Every console shows the https URLs and the certificate's fingerprint, and
     before each login prompt (/etc/issue.d) again.
  4. Nobody at any console and no preseed: Jupyter stays off and the wizard keeps waiting,
     or with `firstboot.unattended: token`, after `unattended_after` seconds a token is made
     and shown on the local consoles only.

Killed at any point, nothing is half-set: jupyter.service needs the stamp, and the stamp is
written last; the next boot runs the wizard again (the preseed is still there until the
stamp is).
"""
