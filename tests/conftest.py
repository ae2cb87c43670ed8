"""Test setup shared by every module.

The fake 8-device CPU mesh must be configured before jax is imported anywhere, so it lives here.

Any XLA flags given to pytest (e.g. `XLA_FLAGS=--xla_cpu_max_isa=AVX2` to check that the numerical tests hold
under another code generation) are kept, for this process and, through `GPTRL_TEST_XLA_FLAGS`, for the
launcher subprocesses that `helpers.env()` starts.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("GPTRL_TEST_XLA_FLAGS", os.environ.get("XLA_FLAGS", "").strip())
os.environ["XLA_FLAGS"] = (
    os.environ["GPTRL_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, shared by the test processes (xdist workers inherit the
# variable from the controller that loads this file first) and the launcher subprocesses (helpers.env() passes the
# environment on): the tiny stages' programs are compiled again by each of the ~40 launches, which roughly a third
# of a subprocess test's time went to (tests/stages/test_resume.py: 85 s -> 57 s). Each run starts empty, so a stale
# executable cannot outlive the code that made it; the process that made the folder removes it at exit. A folder
# given in JAX_COMPILATION_CACHE_DIR is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptrl-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny programs compile in < 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


import pytest  # noqa: E402  (after the XLA flags above, which must be set before anything imports jax)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
  """Headless Debian chromium driven by selenium through /usr/bin/chromedriver (never a downloaded driver)."""
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"no {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras")
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1300",
               "--disable-extensions", "--no-first-run"):
    options.add_argument(flag)
  try:
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  except Exception as e:  # pylint: disable=broad-except  # selenium's WebDriverException
    # On a loaded 2-core runner chromedriver has once taken longer than selenium's ~30 s to answer; one more try.
    print(f"chromedriver did not come up ({type(e).__name__}: {e}); trying once more")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
  driver.implicitly_wait(0)
  yield driver
  driver.quit()
