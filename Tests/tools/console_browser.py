#!/usr/bin/python3
"""Drives Ferry's web console in headless Chromium (Debian chromium + chromium-driver,
python3-selenium), as an operator and then as a viewer. Exits 0 when every check passed;
otherwise prints what failed and saves failure.png beside the screenshots.

    console_browser.py --url https://127.0.0.1:PORT/ui/ --operator TOKEN --viewer TOKEN \
        --plan shop --volume db/data --host db --group shop --screenshots DIR
"""
import argparse
import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def main():
    p = argparse.ArgumentParser()
    for name in ["url", "operator", "viewer", "plan", "volume", "host", "group", "screenshots"]:
        p.add_argument("--" + name, required=True)
    a = p.parse_args()
    os.makedirs(a.screenshots, exist_ok=True)

    options = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,900",
                 # The controller's certificate chains to the cluster's own CA, which this
                 # throwaway browser profile does not hold.
                 "--ignore-certificate-errors"]:
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    steps = []

    def shot(name):
        driver.save_screenshot(os.path.join(a.screenshots, name + ".png"))

    def wait(what, condition, timeout=30):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                value = condition()
                if value:
                    return value
            except (StaleElementReferenceException, WebDriverException) as e:
                last = e
            time.sleep(0.2)
        raise AssertionError("timed out waiting for " + what + (": " + str(last).splitlines()[0] if last else ""))

    def find(css):
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def text(css):
        el = find(css)
        return el.text if el else ""

    def go(fragment):
        driver.execute_script("location.hash = arguments[0]", fragment)

    def sign_in(token):
        driver.get(a.url)
        wait("the sign-in form", lambda: find("#signin"))
        find("#token").send_keys(token)
        find("#signin-button").click()

    host, volume_name = a.volume.split("/")
    try:
        # A wrong token is refused on the form, and nothing is stored.
        sign_in("fat_not-a-token")
        wait("the sign-in error", lambda: "not recognised" in text("#signin-error"))
        assert driver.execute_script("return sessionStorage.length") == 0
        steps.append("a wrong token is refused on the sign-in form")

        # The operator signs in and sees the dashboard.
        sign_in(a.operator)
        wait("the dashboard", lambda: find("#dashboard"))
        assert "console-operator (operator)" in text("#whoami"), text("#whoami")
        wait("host online", lambda: a.host in text("#hosts-online") and "online" in text("#hosts-online"))
        wait("a protected volume counted", lambda: text('#replication-health [data-state="protected"]') == "1")
        assert "protected" in text("#health-banner"), text("#health-banner")
        wait("the open alerts", lambda: find('#open-alerts li[data-alert-rule="certificate-expiring"]'))
        # The token is in this tab's session only: not in the URL, not in localStorage.
        assert a.operator not in driver.current_url
        assert driver.execute_script("return sessionStorage.getItem('ferry.token')") == a.operator
        assert driver.execute_script("return localStorage.length") == 0
        shot("dashboard")
        steps.append("dashboard: host %s online, 1 volume protected" % a.host)

        # The state's count links to the filtered volume list.
        find('#replication-health a[href="#/volumes?state=protected"]').click()
        wait("the filtered volume list", lambda: find('#volumes tr[data-volume="%s"]' % a.volume))
        assert "protected" in text('#volumes tr[data-volume="%s"] .replica-state' % a.volume)
        shot("volumes")
        find('#volumes tr[data-volume="%s"] a' % a.volume).click()
        wait("the volume page", lambda: find("#volume") and find("#lag-chart"))
        wait("lag samples on the chart", lambda: find("#lag-chart polyline"), timeout=20)
        assert find("#resync"), "an operator sees the resync button"
        shot("volume")
        steps.append("volumes: %s protected; its page has a lag chart" % a.volume)

        go("#/group/" + a.group)
        wait("the group page with points", lambda: find("#group") and find("#group tr[data-point]"))
        assert find("#cut-point")
        shot("group")
        steps.append("group %s lists its points" % a.group)

        go("#/alerts")
        wait("the alerts page", lambda: find('#alerts tr[data-alert-rule="certificate-expiring"]'))
        shot("alerts")
        steps.append("alerts page lists the certificate-expiring alerts")

        # Plans: never drilled, so a drill is recommended; start one from the plan's page.
        go("#/plans")
        wait("the plan list", lambda: find('#plans tr[data-plan="%s"]' % a.plan))
        assert "drill recommended" in text('#plans tr[data-plan="%s"]' % a.plan)
        find('#plans tr[data-plan="%s"] a' % a.plan).click()
        wait("the plan page", lambda: find("#plan") and find("#start-drill"))
        shot("plan")
        find("#start-drill").click()
        wait("the job page", lambda: "#/job/" in driver.current_url and find("#job"))
        job_id = driver.current_url.split("#/job/")[1]
        wait("the drill to wait at its gate", lambda: find("#gate") and find("#resume"), timeout=90)
        assert "confirm the drill may start" in text("#gate"), text("#gate")
        shot("job-gate")
        find("#resume").click()
        state = wait("the drill to end", lambda: find("#job").get_attribute("data-state") if find("#job") and
                     find("#job").get_attribute("data-state") in ("succeeded", "failed", "cancelled") else None, timeout=180)
        assert state == "succeeded", "the drill ended " + state + ": " + text("#job")
        wait("the drill report", lambda: find('#report tr[data-key="rpo_seconds"]'))
        assert not find("#resume") and not find("#cancel")
        shot("drill-report")
        steps.append("drill %s started, resumed at its gate and succeeded, all from the page" % job_id)

        find("#signout").click()
        wait("the sign-in form after signing out", lambda: find("#signin"))
        assert driver.execute_script("return sessionStorage.length") == 0

        # A viewer sees the same pages without any write control.
        sign_in(a.viewer)
        wait("the viewer's dashboard", lambda: find("#dashboard"))
        assert "(viewer)" in text("#whoami")
        for fragment, page in [("#/plan/" + a.plan, "#plan"), ("#/job/" + job_id, "#job"), ("#/group/" + a.group, "#group"),
                               ("#/volume/" + a.volume, "#volume")]:
            go(fragment)
            wait(page, lambda: find(page) and find(page).is_displayed())
            writes = driver.find_elements(By.CSS_SELECTOR, "button.write")
            assert not writes, "a viewer sees write controls on %s: %s" % (fragment, [w.text for w in writes])
            if page == "#plan":
                shot("viewer-plan")
        steps.append("a viewer sees plan, job, group and volume pages with no write control")
    except (AssertionError, WebDriverException) as e:
        try:
            shot("failure")
            print("page text at failure:\n" + driver.find_element(By.TAG_NAME, "body").text[:3000], file=sys.stderr)
            for entry in driver.get_log("browser")[-20:]:
                print("console: " + json.dumps(entry), file=sys.stderr)
        except WebDriverException:
            pass
        print("FAILED: %s\nafter: %s" % (e, steps), file=sys.stderr)
        driver.quit()
        return 1
    driver.quit()
    for s in steps:
        print("ok: " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
